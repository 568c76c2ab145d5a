"""Model construction, configuration errors, initialisation and the eager path's shapes."""
import math

import pytest
import torch

from osrt_fast import OSRT
from osrt_fast.config import ConfigError
from osrt_fast.kernels.slot_attention import slot_attention_step_eager
from osrt_fast.model import MixingBlock, SlotAttention, ray_encoding
from conftest import tiny_model_config


def tiny_inputs(batch=2, views=2, height=16, width=24, rays=13):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(batch, views, 3, height, width, generator=g)
    cam = torch.randn(batch, views, 3, generator=g) * 5
    dirs = torch.nn.functional.normalize(torch.randn(batch, views, height, width, 3, generator=g), dim=-1)
    tcam = torch.randn(batch, rays, 3, generator=g) * 5
    tdirs = torch.nn.functional.normalize(torch.randn(batch, rays, 3, generator=g), dim=-1)
    return images, cam, dirs, tcam, tdirs


@pytest.mark.parametrize("decoder", ["slot_mixer", "spatial_broadcast"])
def test_shapes_and_gradients_reach_every_parameter(decoder):
    cfg = tiny_model_config(decoder=decoder)
    if decoder == "spatial_broadcast":
        cfg["decoder_kwargs"] = {"pos_start_octave": -5, "slot_dim": 32, "hidden_dim": 32}
    model = OSRT(cfg)
    images, cam, dirs, tcam, tdirs = tiny_inputs()
    slots = model.encoder(images, cam, dirs)
    assert slots.shape == (2, 3, 32)
    pixels, extras = model.decoder(slots, tcam, tdirs)
    assert pixels.shape == (2, 13, 3) and extras["segmentation"].shape == (2, 13, 3)
    assert torch.allclose(extras["segmentation"].sum(-1), torch.ones(2, 13))
    pixels.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_srt_model_shapes():
    model = OSRT({"encoder": "srt", "decoder": "srt",
                  "encoder_kwargs": {"num_att_blocks": 1, "conv_dim": 8, "latent_dim": 24,
                                     "num_heads": 2, "head_dim": 8, "mlp_dim": 16},
                  "decoder_kwargs": {"num_att_blocks": 1, "latent_dim": 24, "render_hidden_dim": 16}})
    images, cam, dirs, tcam, tdirs = tiny_inputs()
    latents = model.encoder(images, cam, dirs)
    assert latents.shape == (2, 2 * 2 * 3, 24)
    pixels, extras = model.decoder(latents, tcam, tdirs)
    assert pixels.shape == (2, 13, 3) and extras == {}


def test_paper_default_widths():
    model = OSRT({"encoder": "osrt", "decoder": "slot_mixer",
                  "encoder_kwargs": {"num_slots": 32}})
    sd = model.state_dict()
    assert sd["encoder.srt_encoder.conv_blocks.2.layers.2.weight"].shape == (768, 384, 3, 3)
    assert sd["encoder.slot_attention.gru.weight_ih"].shape == (4608, 1536)
    assert sd["decoder.render_mlp.net.0.weight"].shape == (1536, 1716)
    assert sd["decoder.allocation_transformer.transformer.layers.1.1.fn.net.0.weight"].shape == (3072, 180)


def test_paper_initialisation():
    model = OSRT({"encoder": "osrt", "decoder": "slot_mixer", "encoder_kwargs": {"num_slots": 32}})
    sa = model.encoder.slot_attention
    w = sa.to_q.weight
    std = math.sqrt(1 / w.shape[1])
    assert w.abs().max() <= 2 * std + 1e-7                       # truncated at 2 std
    assert w.std().item() == pytest.approx(std * 0.88, rel=0.05)  # std of N(0,1) cut at +-2
    ff = model.encoder.srt_encoder.transformer.layers[0][1].fn.net[0]
    bound = math.sqrt(6 / (ff.weight.shape[0] + ff.weight.shape[1]))
    assert ff.weight.abs().max() <= bound and ff.weight.abs().max() > 0.9 * bound
    assert 0 < ff.bias.abs().max() < 1e-4                         # N(0, 1e-6)
    render = model.decoder.render_mlp.net[0]
    assert torch.all(render.bias == 0)
    assert sa.initial_slots.std().item() == pytest.approx(1.0, rel=0.05)
    default = OSRT({"encoder": "osrt", "decoder": "slot_mixer", "use_default_init": True,
                    "encoder_kwargs": {"num_slots": 2}})
    assert default.decoder.render_mlp.net[0].bias.abs().max() > 0   # PyTorch's default init


def test_mixing_block_is_the_weighted_slot_mean():
    block = MixingBlock(slot_dim=24, att_dim=16)
    x, slots = torch.randn(3, 7, 180), torch.randn(3, 5, 24)
    mixed, w = block(x, slots)
    logits = torch.einsum("brd,bkd->brk", block.to_q(x), block.to_k(slots)) / math.sqrt(16)
    ref_w = logits.softmax(-1)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(mixed, (ref_w.unsqueeze(-1) * slots.unsqueeze(1)).sum(2))


def test_slot_attention_softmax_over_slots_then_renormalised_over_inputs():
    sa = SlotAttention(num_slots=4, input_dim=8, slot_dim=8, hidden_dim=16)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 11, 8), torch.randn(2, 11, 8)
    updates, attn = slot_attention_step_eager(q, k, v, scale=sa.slot_dim ** -0.5, eps=sa.eps)
    torch.testing.assert_close(sa.updates(q, k, v), updates)      # the model's step is the twin
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4))
    raw = (torch.einsum("bkd,bnd->bkn", q, k) / math.sqrt(8)).softmax(1) + 1e-8
    torch.testing.assert_close(attn, raw / raw.sum(-1, keepdim=True))
    torch.testing.assert_close(updates, attn @ v)


def test_ray_encoding_layout():
    pos, ray = torch.tensor([[0.25, 0.5, -1.0]]), torch.tensor([[0.0, 0.6, 0.8]])
    enc = ray_encoding(pos, ray, pos_start_octave=-5)
    assert enc.shape == (1, 180)
    # Position block: sines of x at octaves -5..9, then y, then z; then the cosines.
    assert enc[0, 1].item() == pytest.approx(math.sin(2 ** -4 * math.pi * 0.25), abs=1e-6)
    assert enc[0, 15].item() == pytest.approx(math.sin(2 ** -5 * math.pi * 0.5), abs=1e-6)
    assert enc[0, 45].item() == pytest.approx(math.cos(2 ** -5 * math.pi * 0.25), abs=1e-6)
    assert enc[0, 90 + 16].item() == pytest.approx(math.sin(2 * math.pi * 0.6), abs=1e-5)


def test_image_size_not_divisible_by_8_is_a_clear_error():
    model = OSRT(tiny_model_config())
    images, cam, dirs, _, _ = tiny_inputs(height=20, width=24)
    with pytest.raises(ValueError, match="divisible by 8"):
        model.encoder(images, cam, dirs)


def test_unknown_model_keys_name_the_valid_ones():
    with pytest.raises(ConfigError, match="num_slotz.*valid keys.*num_slots"):
        OSRT({"encoder": "osrt", "decoder": "slot_mixer", "encoder_kwargs": {"num_slotz": 3}})
    with pytest.raises(ConfigError, match="unknown model.decoder 'nerf'.*slot_mixer"):
        OSRT({"encoder": "osrt", "decoder": "nerf"})
    with pytest.raises(ConfigError, match="valid keys in 'model'"):
        OSRT({"encoder": "osrt", "decoder": "slot_mixer", "layers": 3})
    with pytest.raises(ConfigError, match="slot_dim"):
        OSRT({"encoder": "osrt", "decoder": "slot_mixer", "encoder_kwargs": {"slot_dim": 64}})
