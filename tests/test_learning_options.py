"""Options that make the small OSRT learn on the built-in scenes (docs/learning.md): each one off
is the reference's model and step, each one on does what its help says, and the collapse of the
slots shows in the terms, the log and a warning.

- model: ray-encoding octave bands (`pos_octaves`, `ray_start_octave`, `ray_octaves`, encoder and
  decoders) and Pluecker rays (`ray_param`), input image normalisation (`image_mean`, `image_std`), He init of the conv stem
  (`conv_init`);
- training: the slot-importance loss (`slot_balance`, `slot_balance_until`);
- the slot usage terms (`slot_max_share`, `slot_similarity`) and the collapse warning.
"""
import json
import math

import pytest
import torch

from osrt_fast.kernels import OPS
from osrt_fast.kernels._triton import poisoned_outputs
from osrt_fast import OSRT
from osrt_fast.config import ConfigError, RayEncodingConfig, config_from_dict
from osrt_fast.evaluate import compute_loss, slot_importance_cv2, slot_usage
from osrt_fast.guards import CollapseWatch
from osrt_fast.model import RayEncoder, ray_encoding
from osrt_fast.schedule import slot_balance_at
from conftest import tiny_model_config, train_tiny, tiny_data_section
from test_model import tiny_inputs
from test_model_parity import rebuild_reference_weights, relative_error
from test_backend import fast_path_runs

BANDS = {"pos_octaves": 4, "ray_start_octave": -1, "ray_octaves": 5, "ray_param": "plucker"}


def banded_config(decoder="slot_mixer", **encoder):
    cfg = tiny_model_config(decoder=decoder)
    cfg["encoder_kwargs"] = {**cfg["encoder_kwargs"], **BANDS, **encoder}
    if decoder == "spatial_broadcast":
        cfg["decoder_kwargs"] = {"pos_start_octave": -5, "slot_dim": 32, "hidden_dim": 32, **BANDS}
    else:
        cfg["decoder_kwargs"] = {**cfg["decoder_kwargs"], **BANDS}
    return cfg


# -- ray encoding -------------------------------------------------------------------------------

def test_default_octaves_are_the_references_180_features():
    pos, ray = torch.randn(4, 3), torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    enc = RayEncoder(RayEncodingConfig(pos_start_octave=-5))
    assert enc.dim == 180
    torch.testing.assert_close(enc(pos, ray), ray_encoding(pos, ray, -5), rtol=0, atol=0)
    model = OSRT(tiny_model_config())
    assert model.decoder.allocation_transformer.query_dim == 180
    assert model.srt_encoder.conv_blocks[0].layers[0].in_channels == 183


def test_octave_bands_choose_the_features():
    pos, ray = torch.tensor([[0.25, 0.5, -1.0]]), torch.tensor([[0.0, 0.6, 0.8]])
    enc = RayEncoder(RayEncodingConfig(pos_start_octave=-5, pos_octaves=4, ray_start_octave=-1,
                                       ray_octaves=5))
    out = enc(pos, ray)
    assert enc.dim == 6 * (4 + 5) == out.shape[-1]
    # Position: sines of x at octaves -5..-2, then y, z; then the cosines (12 + 12); direction:
    # sines of x at octaves -1..3, then y, z; then the cosines.
    assert out[0, 1].item() == pytest.approx(math.sin(2 ** -4 * math.pi * 0.25), abs=1e-6)
    assert out[0, 12].item() == pytest.approx(math.cos(2 ** -5 * math.pi * 0.25), abs=1e-6)
    assert out[0, 24 + 5].item() == pytest.approx(math.sin(2 ** -1 * math.pi * 0.6), abs=1e-6)
    assert out[0, 24 + 15 + 5 + 2].item() == pytest.approx(math.cos(2 ** 1 * math.pi * 0.6), abs=1e-6)
    # Images [B, H, W, 3] of rays: channels first, the camera's encoding broadcast over pixels.
    grid = enc(pos, ray.expand(2, 3, 3)[None])
    assert grid.shape == (1, 54, 2, 3)
    torch.testing.assert_close(grid[0, :, 1, 2], out[0])
    with pytest.raises(ConfigError, match="ray_octaves = 0: expected a value >= 1"):
        RayEncodingConfig(ray_octaves=0)
    with pytest.raises(ConfigError, match="model.decoder_kwargs.pos_octaves = 0: expected a value >= 1"):
        OSRT({**tiny_model_config(), "decoder_kwargs": {"pos_octaves": 0}})


def test_plucker_rays_encode_the_line_not_the_camera():
    """'plucker': the moment camera x direction replaces the camera position; every origin on the
    same line gives the same features, a parallel line does not."""
    o = torch.tensor([[1.0, -2.0, 3.0]])
    d = torch.nn.functional.normalize(torch.tensor([[0.3, 0.4, -0.8]]), dim=-1)
    enc = RayEncoder(RayEncodingConfig(pos_start_octave=-5, pos_octaves=6, ray_param="plucker"))
    torch.testing.assert_close(enc(o, d), ray_encoding(torch.linalg.cross(o, d), d, -5, 6))
    torch.testing.assert_close(enc(o + 2.5 * d, d), enc(o, d), atol=1e-5, rtol=0)
    assert not torch.allclose(enc(o + torch.tensor([[0.0, 0.5, 0.0]]), d), enc(o, d), atol=1e-3)
    camera = RayEncoder(RayEncodingConfig(pos_start_octave=-5, pos_octaves=6))
    assert not torch.allclose(camera(o + 2.5 * d, d), camera(o, d))
    grid = enc(o, d.expand(2, 3, 3)[None])                       # [B, H, W, 3] rays of one camera
    torch.testing.assert_close(grid[0, :, 1, 2], enc(o, d)[0])
    with pytest.raises(ConfigError, match="ray_param = 'moment': expected one of camera, plucker"):
        RayEncodingConfig(ray_param="moment")


@pytest.mark.parametrize("decoder", ["slot_mixer", "spatial_broadcast", "srt"])
def test_banded_models_have_the_band_widths_and_train(decoder):
    cfg = banded_config("slot_mixer" if decoder == "srt" else decoder)
    if decoder == "srt":
        cfg = {"encoder": "srt", "decoder": "srt",
               "encoder_kwargs": {"num_att_blocks": 1, "conv_dim": 8, "latent_dim": 24, "num_heads": 2,
                                  "head_dim": 12, "mlp_dim": 32, **BANDS},
               "decoder_kwargs": {"num_att_blocks": 1, "latent_dim": 24, "render_hidden_dim": 16, **BANDS}}
    model = OSRT(cfg)
    images, cam, dirs, tcam, tdirs = tiny_inputs()
    pixels, extras = model(images, cam, dirs, tcam, tdirs)
    assert pixels.shape == (2, 13, 3)
    pixels.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    stem = model.srt_encoder.conv_blocks[0].layers[0]
    assert stem.in_channels == 3 + 54


def test_banded_fast_path_matches_eager_forward_and_every_gradient():
    """The Slot Mixer's kernels (interpreted, outputs poisoned) with 54 Pluecker query features
    instead of 180: as accurate against the fp64 eager model as the fp32 eager model is. (The slot-attention
    kernel, which the bands do not reach, runs its twin here; test_backend checks it.)"""
    cfg = banded_config()
    cfg["encoder_kwargs"].update(num_slots=5, slot_iters=2)     # as test_backend's twin of this test

    def kernels(c):
        model = OSRT(c).set_backend("triton", ops={"slot_attention": "eager"})
        assert model.decoder.ops == {"cross_attention": "triton", "mix_render": "triton"}
        return model
    for name, e, f, r in fast_path_runs(cfg, kernels):
        assert f is not None and torch.isfinite(f).all(), name
        if r.abs().max() < 1e-15:
            assert f.abs().max() < 1e-9 and e.abs().max() < 1e-9, name
            continue
        # fp32: at most twice the eager model's error, or 1e-4 where rounding dominates both (the
        # slot LayerNorm's weight has a ~1e-6 gradient of cancelling terms: 2e-5 vs 5e-6 here).
        assert relative_error(f, r) <= max(2 * relative_error(e, r) + 1e-6, 1e-4), name


def test_banded_folded_maths_is_the_eager_function_in_fp64():
    """The folded Slot Mixer (kernels' eager twins) with 54 query features, in fp64: every output
    and parameter gradient equals the eager model's up to rounding (one LayerNorm bias has an
    exactly-zero true gradient, hence the absolute floor)."""
    cfg = banded_config()
    cfg["encoder_kwargs"].update(num_slots=5, slot_iters=2)
    eager = OSRT(cfg)
    eager.load_state_dict(rebuild_reference_weights(eager, 3))
    folded = OSRT(cfg).set_backend("triton", ops=dict.fromkeys(OPS, "eager"))
    folded.load_state_dict(eager.state_dict())
    images, cam, dirs, tcam, tdirs = (t.double() for t in tiny_inputs(batch=2, rays=37))

    def run(model):
        model.double().zero_grad()
        latents = model.encoder(images, cam, dirs)
        pixels, extras = model.decoder(latents, tcam, tdirs)
        ((pixels - 0.5).square().mean() + 0.1 * extras["segmentation"][..., 0].mean()).backward()
        return dict(latents=latents.detach(), pixels=pixels.detach(),
                    segmentation=extras["segmentation"].detach(),
                    **{n: p.grad for n, p in model.named_parameters()})

    expected, got = run(eager), run(folded)
    for name, e in expected.items():
        torch.testing.assert_close(got[name], e, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


# -- the encoder's input: normalisation and the stem's init --------------------------------------

def test_image_normalisation_is_the_encoder_on_normalised_images():
    plain = OSRT(tiny_model_config())
    cfg = tiny_model_config()
    cfg["encoder_kwargs"] = {**cfg["encoder_kwargs"], "image_mean": 0.25, "image_std": 0.15}
    normed = OSRT(cfg)
    normed.load_state_dict(plain.state_dict())
    images, cam, dirs, _, _ = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(normed.encoder(images, cam, dirs),
                                   plain.encoder((images - 0.25) / 0.15, cam, dirs))
        assert not torch.allclose(normed.encoder(images, cam, dirs), plain.encoder(images, cam, dirs))
    cfg["encoder_kwargs"]["image_std"] = 0.0
    with pytest.raises(ConfigError, match="model.encoder_kwargs.image_std = 0.0: expected a positive number"):
        OSRT(cfg)


def test_he_init_keeps_the_stems_signal():
    """Default: PyTorch's conv init (the reference's), whose patch tokens barely differ; 'he':
    He-normal weights (std sqrt(2 / fan_in)), and tokens that differ from patch to patch."""
    def tokens_spread(conv_init):
        torch.manual_seed(0)
        cfg = tiny_model_config()
        cfg["encoder_kwargs"] = {**cfg["encoder_kwargs"], "conv_init": conv_init}
        model = OSRT(cfg)
        images, cam, dirs, _, _ = tiny_inputs()
        with torch.no_grad():
            tokens = model.srt_encoder.stem(images, cam, dirs)
        return model, (tokens - tokens.mean(1, keepdim=True)).norm(dim=-1).mean() / tokens.norm(dim=-1).mean()

    default, spread_default = tokens_spread("default")
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(),
                                                 OSRT(tiny_model_config()).state_dict().values()))
    he, spread_he = tokens_spread("he")
    conv = he.srt_encoder.conv_blocks[1].layers[0]
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.1)
    assert spread_he > 10 * spread_default
    cfg = tiny_model_config()
    cfg["encoder_kwargs"] = {**cfg["encoder_kwargs"], "conv_init": "xavier"}
    with pytest.raises(ConfigError, match="model.encoder_kwargs.conv_init = 'xavier': expected one of default, he"):
        OSRT(cfg)


# -- slot usage terms and the slot-importance loss ----------------------------------------------

def test_slot_usage_and_importance_of_known_weights():
    k = 4
    uniform = torch.full((1, 6, k), 1 / k)
    collapsed = torch.zeros(1, 6, k)
    collapsed[..., 2] = 1
    halves = torch.zeros(1, 6, k)
    halves[:, :3, 0] = 1
    halves[:, 3:, 1] = 1
    weights = torch.cat((uniform, collapsed, halves))
    usage = slot_usage(weights)
    torch.testing.assert_close(usage["slot_max_share"], torch.tensor([0.25, 1.0, 0.5]))
    torch.testing.assert_close(slot_importance_cv2(weights), torch.tensor([0.0, 3.0, 1.0]))
    slots = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    # Pairs (0,1): 1, (0,2): 0, (1,2): 0 -> mean 1/3.
    assert slot_usage(weights[:1, :, :3], slots)["slot_similarity"].item() == pytest.approx(1 / 3)


def test_slot_balance_off_is_the_references_step_and_on_adds_its_gradient(data_dir):
    from osrt_fast.data import batch_spec, get_dataset, model_batch
    from osrt_fast.data.records import collate
    cfg = config_from_dict({"data": tiny_data_section(data_dir), "model": tiny_model_config()})
    dataset = get_dataset("train", cfg.data)
    batch = model_batch(collate([dataset[(i, i)] for i in range(3)]), batch_spec(cfg.data, dataset))
    model = OSRT(cfg.model)
    mse, terms = compute_loss(model, batch)
    assert "aux_loss" not in terms
    assert set(terms) == {"mse", "ari", "fg_ari", "slot_max_share", "slot_similarity"}
    assert all(t.shape == (3,) and not t.requires_grad for t in terms.values())
    mse2, terms2 = compute_loss(model, batch, slot_balance=0.5)
    torch.testing.assert_close(mse2, mse)
    aux = terms2.pop("aux_loss")
    assert aux.requires_grad and aux.shape == (3,)
    with torch.no_grad():
        _, extras = model(batch["input_images"], batch["input_camera_pos"], batch["input_rays"],
                          batch["target_camera_pos"], batch["target_rays"])
    torch.testing.assert_close(aux.detach(), 0.5 * slot_importance_cv2(extras["segmentation"]))
    mixing = model.decoder.mixing_block.to_k.weight
    grad_mse = torch.autograd.grad(mse2.mean(), mixing, retain_graph=True)[0]
    grad_both = torch.autograd.grad(mse2.mean() + aux.mean(), mixing)[0]
    assert not torch.allclose(grad_mse, grad_both)


def test_slot_balance_falls_to_zero_over_its_steps():
    t = config_from_dict({"training": {"slot_balance": 0.02, "slot_balance_until": 100}}).training
    assert [slot_balance_at(t, it) for it in (0, 50, 100, 500)] == pytest.approx([0.02, 0.01, 0, 0])
    t = config_from_dict({"training": {"slot_balance": 0.02}}).training
    assert slot_balance_at(t, 10 ** 6) == 0.02
    assert config_from_dict({}).training.slot_balance == 0.0        # the reference: off
    with pytest.raises(ConfigError, match="slot_balance"):
        config_from_dict({"training": {"slot_balance": -1}})


def test_collapse_watch_warns_once_per_streak():
    watch = CollapseWatch(share=0.95, times=3)
    said = [watch.update(s, it) for it, s in enumerate([0.99, 0.97, 0.5, 0.99, 0.98, 0.99, 0.999, None])]
    assert [i for i, m in enumerate(said) if m] == [5]
    assert "slot collapse" in said[5] and "iteration 5" in said[5] and "slot_balance" in said[5]


def test_training_logs_slot_usage_and_warns_of_collapse(tmp_path, data_dir, capsys, monkeypatch):
    """A run's log carries the slot usage of its training batches and evaluations; a run whose
    one slot takes every ray says so after three evaluations."""
    import osrt_fast.trainer as trainer
    monkeypatch.setattr(trainer, "CollapseWatch", lambda: CollapseWatch(share=0.0, times=3))
    log = train_tiny(tmp_path, tiny_data_section(data_dir), steps=3, validate_every=1,
                     slot_balance=0.1, slot_balance_until=2)
    steps = [r for r in log if "loss" in r]
    evals = [r for r in log if r.get("split") == "val"]
    assert len(steps) == 3 and len(evals) == 3
    assert all(0 < r["slot_max_share"] <= 1 and -1 <= r["slot_similarity"] <= 1 for r in steps + evals)
    out = capsys.readouterr().out
    assert out.count("warning: slot collapse") == 1
    progress = [x for x in out.splitlines() if x.startswith("it ")]     # no terminal: plain lines
    assert len(progress) == 3 and all("top_slot=" in x and "slot_sim=" in x for x in progress)


def test_max_minutes_stops_on_the_runs_training_time(tmp_path, data_dir, capsys):
    """--max-minutes: the run stops (saving model.pt) once its training time, summed over its
    resumes, reaches the budget; a resumed run past the budget takes no step."""
    import osrt_fast.trainer as trainer
    from test_training import write_config
    config = write_config(tmp_path, data_dir, max_it=50)
    assert trainer.main([config, "--max-minutes", "1e-4"]) == 0      # 6 ms: the first step ends it
    log = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl")]
    assert [r["it"] for r in log] == [1]
    assert "Reached the time budget" in capsys.readouterr().out
    assert trainer.main([config, "--max-minutes", "1e-4"]) == 0
    assert len(open(tmp_path / "run" / "log.jsonl").readlines()) == 1


@pytest.mark.parametrize("ray_param", ["camera", "plucker"])
def test_the_encoders_ray_encoding_is_ray_encoding_exactly(ray_param):
    """RayEncoder.encode writes ray_encoding's values (no concatenations), into a buffer's slice
    too, bit for bit; the encoder's stem builds its channels-last input from it and computes
    what the conv blocks give on the concatenated images and encodings."""
    cfg = RayEncodingConfig(pos_start_octave=-5, pos_octaves=4, ray_start_octave=-1, ray_octaves=3,
                            ray_param=ray_param)
    enc = RayEncoder(cfg)
    cam = torch.randn(5, 1, 1, 3)
    rays = torch.nn.functional.normalize(torch.randn(5, 6, 7, 3), dim=-1)
    pos = torch.linalg.cross(cam.expand(rays.shape), rays) if ray_param == "plucker" else cam
    expected = ray_encoding(pos, rays, -5, 4, -1, 3)
    assert torch.equal(enc.encode(cam, rays), expected)
    buffer = torch.full((5, 6, 7, 2 + enc.dim), float("nan"))
    enc.encode(cam, rays, out=buffer[..., 2:])
    assert torch.equal(buffer[..., 2:], expected) and buffer[..., :2].isnan().all()

    model = OSRT({**tiny_model_config(), "encoder_kwargs": {
        **tiny_model_config()["encoder_kwargs"], "pos_octaves": 4, "ray_start_octave": -1,
        "ray_octaves": 3, "ray_param": ray_param, "image_mean": 0.3, "image_std": 0.2}})
    srt = model.srt_encoder
    images, cam, dirs, _, _ = tiny_inputs(batch=2)
    flat_cam = cam.flatten(0, 1)[:, None, None]
    flat_rays = dirs.flatten(0, 1)
    pos = torch.linalg.cross(flat_cam.expand(flat_rays.shape), flat_rays) if ray_param == "plucker" else flat_cam
    x = torch.cat(((images.flatten(0, 1) - 0.3) / 0.2,
                   ray_encoding(pos, flat_rays, -5, 4, -1, 3).permute(0, 3, 1, 2)), 1)
    tokens = srt.per_patch_linear(srt.conv_blocks(x))
    tokens = tokens.flatten(2).transpose(1, 2).reshape(2, -1, tokens.shape[1])
    torch.testing.assert_close(srt.stem(images, cam, dirs), tokens, rtol=1e-5, atol=1e-6)
