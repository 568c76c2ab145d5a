import os

import pytest
import torch

from osrt_fast import OSRT
from osrt_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from conftest import tiny_model_config


def make(num_slots=3):
    cfg = tiny_model_config()
    cfg["encoder_kwargs"] = {**cfg["encoder_kwargs"], "num_slots": num_slots}
    model = OSRT(cfg)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def take_a_step(model, opt):
    opt.zero_grad()
    sum(p.square().sum() for p in model.parameters()).backward()
    opt.step()


def test_round_trip_model_optimizer_and_scalars(tmp_path):
    model, opt = make()
    take_a_step(model, opt)
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, model, opt, it=7, epoch_it=1, t=3.5, loss_val_best=21.0, run_id=None)
    other, other_opt = make()
    rest = load_checkpoint(path, other, other_opt)
    assert rest["it"] == 7 and rest["loss_val_best"] == 21.0 and rest["osrt_fast"]["version"] == 1
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n
    assert other_opt.state_dict()["state"][0]["step"] == 1
    # Our file is a reference checkpoint too: plain 'encoder'/'decoder' state dicts.
    raw = torch.load(path, weights_only=True)
    assert set(raw["encoder"]) == set(model.encoder.state_dict())


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model, opt = make()
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, model, opt, it=1)
    before = open(path, "rb").read()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, opt, it=2)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["model.pt"]          # no temporary file left behind


def test_non_finite_model_is_refused_and_good_file_kept(tmp_path):
    model, opt = make()
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, model, opt, it=1)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(path, model, opt, it=2)
    fresh, _ = make()
    assert load_checkpoint(path, fresh)["it"] == 1


class NotATensor:
    pass


def test_files_that_need_code_are_refused(tmp_path):
    model, _ = make()
    path = str(tmp_path / "evil.pt")
    torch.save({"encoder": model.encoder.state_dict(), "decoder": model.decoder.state_dict(),
                "payload": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="arbitrary Python code"):
        load_checkpoint(path, model)


def test_reference_format_checkpoint_loads(tmp_path):
    src, opt = make()
    take_a_step(src, opt)
    path = str(tmp_path / "model.pt")
    torch.save({"encoder": src.encoder.state_dict(), "decoder": src.decoder.state_dict(),
                "optimizer": opt.state_dict(), "it": 5, "epoch_it": 0, "t": 1.0,
                "loss_val_best": 12.5, "run_id": None}, path)
    dst, dst_opt = make()
    rest = load_checkpoint(path, dst, dst_opt)
    assert rest["it"] == 5 and "osrt_fast" not in rest
    assert torch.equal(dst.encoder.slot_attention.initial_slots, src.encoder.slot_attention.initial_slots)


def test_mismatch_names_keys_shapes_and_the_fitting_config(tmp_path):
    src, _ = make(num_slots=3)
    path = str(tmp_path / "model.pt")
    torch.save({"encoder": src.encoder.state_dict(), "decoder": src.decoder.state_dict()}, path)
    dst, _ = make(num_slots=5)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, dst)
    msg = str(e.value)
    assert "slot_attention.initial_slots: checkpoint (3, 32) vs model (5, 32)" in msg
    assert "num_slots: 3" in msg
    srt = OSRT({"encoder": "srt", "decoder": "srt"})
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(path, srt)


def test_missing_file_is_named(tmp_path):
    model, _ = make()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"), model)


def test_refusal_says_how_to_resave(tmp_path):
    model, _ = make()
    path = str(tmp_path / "evil.pt")
    torch.save({"encoder": model.encoder.state_dict(), "decoder": model.decoder.state_dict(),
                "payload": NotATensor()}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, model)
    assert "needs arbitrary Python code" in str(e.value) and "weights_only=False" in str(e.value)


class CompiledLike(torch.nn.Module):
    """Stands in for torch.compile's wrapper: the real module is `_orig_mod`."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner


def test_wrapped_model_saves_the_inner_keys(tmp_path):
    model, opt = make()
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, CompiledLike(model), opt, it=3)
    raw = torch.load(path, weights_only=True)
    assert set(raw["encoder"]) == set(model.encoder.state_dict())
    assert raw["osrt_fast"]["model_config"]["encoder"] == "osrt"
    other, _ = make()
    assert load_checkpoint(path, CompiledLike(other))["it"] == 3
    assert torch.equal(other.encoder.slot_attention.initial_slots,
                       model.encoder.slot_attention.initial_slots)


def test_non_strict_load_keeps_fitting_weights(tmp_path, capsys):
    src, _ = make(num_slots=3)
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, src, it=1)
    dst, _ = make(num_slots=5)
    init_slots = dst.encoder.slot_attention.initial_slots.clone()
    load_checkpoint(path, dst, strict=False)
    assert "initial_slots" in capsys.readouterr().out
    assert torch.equal(dst.encoder.slot_attention.initial_slots, init_slots)    # left at init
    assert torch.equal(dst.decoder.state_dict()["mixing_block.to_q.weight"],
                       src.decoder.state_dict()["mixing_block.to_q.weight"])


def test_flat_state_dict_loads(tmp_path):
    src, _ = make()
    path = str(tmp_path / "flat.pt")
    torch.save(src.state_dict(), path)
    dst, _ = make()
    load_checkpoint(path, dst)
    for (n, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), n


def test_rng_state_round_trip():
    from osrt_fast.checkpoint import capture_rng_state, restore_rng_state
    state = capture_rng_state()
    a = torch.rand(3)
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), a)
