"""Training loop: learning, exact resume, schedule, bad input, Ctrl-C, end-to-end CLI."""
import json
import re
import os

import pytest
import torch
import yaml

import osrt_fast.trainer as trainer
from osrt_fast import OSRT
from osrt_fast.checkpoint import load_checkpoint, save_checkpoint
from osrt_fast.config import config_from_dict, load_config
from osrt_fast.data import ResumableBatchSampler, batch_spec, get_dataset, model_batch
from osrt_fast.evaluate import compute_loss
from osrt_fast.evaluate import main as evaluate_main
from osrt_fast.schedule import LrSchedule
from conftest import tiny_data_section, tiny_model_config




def write_config(tmp_path, data_dir, **training):
    cfg = {"data": tiny_data_section(data_dir),
           "model": tiny_model_config(),
           "training": {"batch_size": 4, "num_workers": 0, "print_every": 1,
                        "visualize_every": 0, "validate_every": 0, "checkpoint_every": 3,
                        "backup_every": 0, "max_it": 6, "lr_warmup": 2, "peak_lr": 1e-3,
                        "eval_batch_size": 4, "vis_scenes": 2, **training}}
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def params(path):
    model = OSRT(tiny_model_config())
    load_checkpoint(path, model)
    return model.state_dict()


def test_lr_schedule_matches_the_reference():
    s = LrSchedule(peak_lr=1e-4, warmup=10000, decay_rate=0.16, decay_it=4_000_000)
    assert s(0) == 0 and s(5000) == pytest.approx(5e-5)
    assert s(10000) == pytest.approx(1e-4)
    assert s(10000 + 4_000_000) == pytest.approx(1.6e-5)


def test_lr_cooldown_ends_the_schedule_at_zero_and_leaves_the_steps_before_it():
    plain = LrSchedule(peak_lr=1e-3, warmup=100, decay_rate=0.16, decay_it=40000)
    cooled = LrSchedule(peak_lr=1e-3, warmup=100, decay_rate=0.16, decay_it=40000, cooldown=8000,
                        max_it=38000)
    for it in (0, 50, 100, 20000, 30000):
        assert cooled(it) == plain(it)
    assert cooled(34000) == pytest.approx(plain(34000) / 2)
    assert cooled(38000) == 0.0 and cooled(39000) == 0.0
    assert "cooldown" not in plain.state_dict()         # checkpoints without one compare unchanged
    assert cooled.state_dict()["cooldown"] == 8000
    with pytest.raises(ValueError, match="max_it"):
        LrSchedule(cooldown=10)
    t = config_from_dict({"training": {"peak_lr": 1e-3, "lr_warmup": 100, "decay_it": 40000,
                                       "max_it": 38000, "lr_cooldown": 8000}}).training
    assert LrSchedule.from_config(t).state_dict() == cooled.state_dict()


def test_loss_falls_on_a_fixed_batch(data_dir):
    cfg = config_from_dict({"data": tiny_data_section(data_dir)})
    ds = get_dataset("train", cfg.data)
    batch = model_batch([ds[(i, i)] for i in range(4)], batch_spec(cfg.data, ds))
    model = OSRT(tiny_model_config())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        mse, terms = compute_loss(model, batch)
        mse.mean().backward()
        opt.step()
        losses.append(mse.mean().item())
    assert losses[-1] < 0.5 * losses[0], losses
    # the slot-usage terms come with a slot decoder (the tiny model's Slot Mixer)
    assert set(terms) == {"mse", "ari", "fg_ari", "slot_max_share", "slot_similarity"}


def test_batch_stream_depends_only_on_seed_and_iteration():
    a = ResumableBatchSampler(30, 4, seed=3)
    b = ResumableBatchSampler(30, 4, seed=3, start_it=9)
    it_a = iter(a)
    batches = [next(it_a) for _ in range(12)]
    assert next(iter(b)) == batches[9]
    epoch = [i for batch in batches[:7] for i, _ in batch]     # 30 // 4 = 7 steps per epoch
    assert len(set(epoch)) == 28
    assert batches[0] != ResumableBatchSampler(30, 4, seed=4).batch(0)


def test_resume_continues_exactly(tmp_path, data_dir):
    straight = write_config(tmp_path / "a", data_dir) if (tmp_path / "a").mkdir() is None else None
    assert trainer.main([straight, "--exit-after", "6"]) == 0
    split = write_config(tmp_path / "b", data_dir) if (tmp_path / "b").mkdir() is None else None
    assert trainer.main([split, "--exit-after", "3"]) == 0
    assert load_checkpoint(os.path.join(os.path.dirname(split), "model.pt"),
                           OSRT(tiny_model_config()))["it"] == 3
    assert trainer.main([split, "--exit-after", "6"]) == 0
    a = params(os.path.join(os.path.dirname(straight), "model.pt"))
    b = params(os.path.join(os.path.dirname(split), "model.pt"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_non_finite_losses_stop_without_touching_the_checkpoint(tmp_path, data_dir, monkeypatch):
    config = write_config(tmp_path, data_dir, max_nonfinite_steps=3)
    assert trainer.main([config, "--exit-after", "3"]) == 0
    ckpt = os.path.join(os.path.dirname(config), "model.pt")
    before = open(ckpt, "rb").read()
    real = trainer.compute_loss

    def nan_loss(model, batch, max_rays=None, **kwargs):
        mse, terms = real(model, batch, max_rays, **kwargs)
        return mse * float("nan"), terms
    monkeypatch.setattr(trainer, "compute_loss", nan_loss)
    with pytest.warns(UserWarning, match="non-finite loss"):
        assert trainer.main([config, "--exit-after", "6"]) == 3
    assert open(ckpt, "rb").read() == before


def test_ctrl_c_saves_the_model(tmp_path, data_dir, monkeypatch):
    config = write_config(tmp_path, data_dir, checkpoint_every=100)
    real, calls = trainer.compute_loss, []

    def interrupt_on_third(model, batch, max_rays=None, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, batch, max_rays, **kwargs)
    monkeypatch.setattr(trainer, "compute_loss", interrupt_on_third)
    assert trainer.main([config]) == 130
    state = load_checkpoint(os.path.join(os.path.dirname(config), "model.pt"), OSRT(tiny_model_config()))
    assert state["it"] == 2


def test_end_to_end_logs_visualises_evaluates(tmp_path, data_dir):
    config = write_config(tmp_path, data_dir, validate_every=4, visualize_every=4)
    assert trainer.main([config, "--exit-after", "4", "--evalnow"]) == 0
    run = os.path.dirname(config)
    assert {"model.pt", "model_best.pt", "log.jsonl", "renders-val.png", "renders-train.png"} \
        <= set(os.listdir(run))
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    steps = [r for r in log if "loss" in r]
    assert [r["it"] for r in steps] == [1, 2, 3, 4]
    assert all(r["scenes_per_s"] > 0 and r["rays_per_s"] > 0 and r["tflops_per_s"] > 0 for r in steps)
    evals = [r for r in log if r.get("split") == "val"]
    assert len(evals) == 2 and {"psnr", "ari", "fg_ari", "mse"} <= set(evals[0])
    assert "ssim" not in evals[0]                   # sampled rays make no images


    out = str(tmp_path / "eval.json")
    assert evaluate_main([config, "--full-scale", "--max-eval", "3", "--output", out]) == 0
    result = json.load(open(out))
    assert result["num_scenes"] == 3 and result["it"] == 4
    assert all(-1 <= result[k] <= 1 for k in ("ari", "fg_ari")) and result["psnr"] > 5   # ARI can be < 0
    assert -1 <= result["ssim"] <= 1                 # whole views: SSIM too


def test_reference_run_directory_resumes(tmp_path, data_dir):
    config = write_config(tmp_path, data_dir)
    model = OSRT(tiny_model_config())
    torch.save({"encoder": model.encoder.state_dict(), "decoder": model.decoder.state_dict(),
                "optimizer": torch.optim.Adam(model.parameters()).state_dict(), "it": 4,
                "epoch_it": 0, "t": 0.0, "loss_val_best": -float("inf"), "run_id": None},
               os.path.join(os.path.dirname(config), "model.pt"))
    assert trainer.main([config, "--exit-after", "5"]) == 0
    log = [json.loads(line) for line in open(os.path.join(os.path.dirname(config), "log.jsonl"))]
    assert [r["it"] for r in log] == [5]


def test_bad_config_key_exits_2_naming_it(tmp_path, data_dir, capsys):
    config = write_config(tmp_path, data_dir, learning_rate=0.1)
    assert trainer.main([config]) == 2
    err = capsys.readouterr().err
    assert "training.learning_rate" in err and "peak_lr" in err


def test_missing_dataset_folder_exits_2(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "clevr3d", "path": str(tmp_path / "nope")},
                                    "model": tiny_model_config()}))
    assert trainer.main([str(path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_checkpoint_of_another_model_exits_2(tmp_path, data_dir, capsys):
    config = write_config(tmp_path, data_dir)
    other = OSRT(tiny_model_config(encoder_kwargs={**tiny_model_config()["encoder_kwargs"], "num_slots": 6}))
    save_checkpoint(os.path.join(os.path.dirname(config), "model.pt"), other, it=1)
    assert trainer.main([config]) == 2
    assert "initial_slots" in capsys.readouterr().err


def test_real_ctrl_c_finishes_the_step_and_resumes_exactly(tmp_path, data_dir, monkeypatch):
    import signal
    before = signal.getsignal(signal.SIGINT)     # SIG_IGN where pytest was started in the background
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = write_config(tmp_path / "a", data_dir, checkpoint_every=100)
    assert trainer.main([straight, "--exit-after", "5"]) == 0
    config = write_config(tmp_path / "b", data_dir, checkpoint_every=100)
    real, calls = trainer.compute_loss, []

    def ctrl_c_during_third_step(model, batch, max_rays=None, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)     # the handler defers it to the step's end
        return real(model, batch, max_rays, **kwargs)
    monkeypatch.setattr(trainer, "compute_loss", ctrl_c_during_third_step)
    assert trainer.main([config, "--exit-after", "5"]) == 130
    ckpt = os.path.join(os.path.dirname(config), "model.pt")
    assert load_checkpoint(ckpt, OSRT(tiny_model_config()))["it"] == 3
    assert signal.getsignal(signal.SIGINT) is before     # handler restored
    monkeypatch.setattr(trainer, "compute_loss", real)
    assert trainer.main([config, "--exit-after", "5"]) == 0
    a, b = params(os.path.join(os.path.dirname(straight), "model.pt")), params(ckpt)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_holds_schedule_rng_and_seed(tmp_path, data_dir):
    config = write_config(tmp_path, data_dir, seed=5)
    assert trainer.main([config, "--exit-after", "3"]) == 0
    raw = torch.load(os.path.join(os.path.dirname(config), "model.pt"), weights_only=True)
    extras = raw["osrt_fast"]
    assert extras["version"] == 1 and extras["seed"] == 5
    assert extras["lr_scheduler"] == {"peak_lr": 1e-3, "warmup": 2, "decay_rate": 0.16,
                                      "decay_it": 4_000_000}
    assert extras["rng"]["torch"].dtype == torch.uint8
    assert raw["it"] == 3 and set(raw) >= {"encoder", "decoder", "optimizer", "epoch_it", "t",
                                           "loss_val_best", "run_id"}


def test_non_finite_gradients_are_skipped_and_training_goes_on(tmp_path, data_dir, monkeypatch):
    config = write_config(tmp_path, data_dir, print_every=0)
    real, calls = trainer.compute_loss, []

    def nan_grad_on_second(model, batch, max_rays=None, **kwargs):
        mse, terms = real(model, batch, max_rays, **kwargs)
        calls.append(1)
        if len(calls) == 2:     # finite loss, NaN gradient: 0 * d sqrt(x)/dx at x = 0
            p = next(model.parameters())
            mse = mse + 0.0 * (p.sum() * 0.0).sqrt()
        return mse, terms
    monkeypatch.setattr(trainer, "compute_loss", nan_grad_on_second)
    with pytest.warns(UserWarning, match="non-finite gradients .* at iteration 1"):
        assert trainer.main([config, "--exit-after", "4"]) == 0
    model = OSRT(tiny_model_config())
    assert load_checkpoint(os.path.join(os.path.dirname(config), "model.pt"), model)["it"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_train_py_bad_key_is_one_clean_message(tmp_path, data_dir):
    import subprocess
    import sys
    config = write_config(tmp_path, data_dir, learning_rate=0.1)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "train.py"), config],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "training.learning_rate" in proc.stderr and "Traceback" not in proc.stderr


def test_named_config_trains_in_runs_dir_and_prints_model(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, data_dir)
    named = tmp_path / "mytiny.yaml"
    named.write_text(open(config).read())
    assert trainer.main([str(named), "--exit-after", "1", "--print-model"]) == 0
    out = capsys.readouterr().out
    assert "Run directory: runs/mytiny" in out and "slot_attention.initial_slots" in out
    assert {"config.yaml", "model.pt", "log.jsonl"} <= set(os.listdir(tmp_path / "runs" / "mytiny"))


def test_evaluate_without_checkpoint_exits_2(tmp_path, data_dir, capsys):
    config = write_config(tmp_path, data_dir)
    assert evaluate_main([config]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def named_config(tmp_path, data_dir, model=None, **training):
    """A config outside a run folder (so train.py would make runs/<name>/), and that folder."""
    cfg = yaml.safe_load(open(write_config(tmp_path, data_dir, **training)))
    if model is not None:
        cfg["model"] = model
    path = tmp_path / "named.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), tmp_path / "runs" / "named"


def test_a_bad_model_key_is_refused_before_data_or_run_folder(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = tiny_model_config()
    model["encoder_kwargs"]["slot_width"] = 7
    config, run = named_config(tmp_path, data_dir, model=model)
    monkeypatch.setattr(trainer, "get_dataset", lambda *a, **k: pytest.fail("data was read"))
    assert trainer.main([config]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) 'slot_width'" in err and "in model.encoder_kwargs" in err
    assert not run.exists()


def test_wandb_without_the_package_fails_at_start(tmp_path, data_dir, monkeypatch, capsys):
    import importlib.util
    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config, run = named_config(tmp_path, data_dir)
    assert trainer.main([config, "--wandb"]) == 2
    assert "pip install 'osrt-fast[wandb]'" in capsys.readouterr().err
    assert not run.exists()


def test_the_test_split_never_selects_the_model(tmp_path, data_dir, capsys):
    """--test reports the test split's metrics; model_best.pt comes from validation alone."""
    config = write_config(tmp_path, data_dir, validate_every=2)
    run = os.path.dirname(config)
    assert trainer.main([config, "--exit-after", "2", "--evalnow", "--test"]) == 0
    out = capsys.readouterr().out
    assert "Evaluating on test" in out and not os.path.exists(os.path.join(run, "model_best.pt"))
    # num_scenes is a count, printed as one
    assert re.search(r"num_scenes=\d+(,|$)", out, re.M), out
    assert trainer.main([config, "--exit-after", "4"]) == 0
    assert os.path.exists(os.path.join(run, "model_best.pt"))


def test_without_a_terminal_progress_is_plain_lines(tmp_path, data_dir, capsys):
    """Under pytest stderr is no terminal, as in a log file: no bar, no carriage returns; a
    plain line per log step instead."""
    config = write_config(tmp_path, data_dir, print_every=2)
    assert trainer.main([config, "--exit-after", "4"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    lines = [x for x in captured.out.splitlines() if x.startswith("it ")]
    assert [x.split(":")[0] for x in lines] == ["it 2/4", "it 4/4"]
    assert "loss=" in lines[0] and "scenes_s=" in lines[0]


def test_what_is_due_at_a_skipped_step_still_happens(tmp_path, data_dir, monkeypatch):
    """A step the guard skips still reaches its iteration: the evaluation, the backup and the
    checkpoint due there happen (the weights are those of the last good step)."""
    config = write_config(tmp_path, data_dir, print_every=0, checkpoint_every=3, backup_every=3,
                          validate_every=3)
    real, calls = trainer.compute_loss, []

    def nan_on_third_step(model, batch, max_rays=None, **kwargs):
        mse, terms = real(model, batch, max_rays, **kwargs)
        if model.training:
            calls.append(1)
            if len(calls) == 3:                 # the step that reaches iteration 3
                mse = mse * float("nan")
        return mse, terms
    monkeypatch.setattr(trainer, "compute_loss", nan_on_third_step)
    with pytest.warns(UserWarning, match="non-finite loss .* at iteration 2"):
        assert trainer.main([config, "--exit-after", "5", "--no-final-look"]) == 0
    run = os.path.dirname(config)
    evaluations = [r["it"] for r in map(json.loads, open(os.path.join(run, "log.jsonl"))) if "split" in r]
    assert evaluations == [3]
    model = OSRT(tiny_model_config())
    assert load_checkpoint(os.path.join(run, "model_3.pt"), model)["it"] == 3


def test_test_split_metrics_go_to_wandb_under_its_name(tmp_path, data_dir, monkeypatch):
    """--test --wandb: the test split's metrics are logged as test/..., never as val/..."""
    import sys
    import types
    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: None, log=lambda rec, step: logged.append(rec),
                                 util=types.SimpleNamespace(generate_id=lambda: "run-id"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "wandb" else real(name, *a))
    config = write_config(tmp_path, data_dir, print_every=0, validate_every=2)
    assert trainer.main([config, "--exit-after", "2", "--test", "--wandb"]) == 0
    keys = {k for rec in logged for k in rec}
    assert "test/psnr" in keys and not any(k.startswith("val/") for k in keys), keys


def test_threads_sets_the_intra_op_threads_and_refuses_nonsense(tmp_path, data_dir, capsys):
    from osrt_fast.runs import parse_train_args
    with pytest.raises(SystemExit) as stop:
        parse_train_args(["c.yaml", "--threads", "0"])
    assert stop.value.code == 2 and "expected a whole number >= 1, got '0'" in capsys.readouterr().err
    config = write_config(tmp_path, data_dir, print_every=0)
    before = torch.get_num_threads()
    try:
        assert trainer.main([config, "--exit-after", "1", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_with_data_cache_the_training_scenes_are_decoded_before_the_first_step(tmp_path, data_dir,
                                                                                monkeypatch, capsys):
    """data.cache: the trainer fills the training set's cache up front (one line says so), so no
    step decodes a file; the run trains as without it."""
    from osrt_fast.runs import TrainOptions
    path = write_config(tmp_path, data_dir, print_every=0)
    cfg = load_config(path)
    cfg.data.cache = True
    run = trainer.Trainer(cfg, str(tmp_path / "run"), TrainOptions(exit_after=2))
    ds = run.train_set
    assert set(ds.cache) == set(ds.split_scenes()) and len(ds.cache) > 0
    assert "Cached %d training scenes" % len(ds.cache) in capsys.readouterr().out
    monkeypatch.setattr(ds, "_read_scene", lambda s: pytest.fail(f"scene {s} decoded in a step"))
    assert run.run() == 0 and run.it == 2
