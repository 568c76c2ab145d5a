import copy
import glob
import os

import pytest
import yaml

from osrt_fast.config import ConfigError, config_from_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.training.batch_size > 0 and cfg.data.num_points > 0


def test_reference_config_loads_unchanged(tmp_path):
    # The reference's runs/msn/osrt/config.yaml, verbatim.
    text = """
data:
  dataset: osrt
  num_points: 2304
model:
  encoder: osrt
  encoder_kwargs:
    pos_start_octave: -5
    num_slots: 32
  decoder: slot_mixer
  decoder_kwargs:
    pos_start_octave: -5

training:
  num_workers: 1
  batch_size: 256
  model_selection_metric: psnr
  model_selection_mode: maximize
  print_every: 10
  visualize_every: 2000
  validate_every: 2000
  checkpoint_every: 200
  backup_every: 25000
  max_it: 4000000
  decay_it: 4000000
  lr_warmup: 10000
"""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = load_config(str(path))
    assert cfg.model.encoder_kwargs == {"pos_start_octave": -5, "num_slots": 32}
    assert cfg.training.lr_warmup == 10000 and cfg.data.num_points == 2304


def test_unknown_keys_are_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'training.batchsize'.*valid keys.*batch_size"):
        config_from_dict({"training": {"batchsize": 4}})
    with pytest.raises(ConfigError, match=r"unknown config section.*'trainer'"):
        config_from_dict({"trainer": {}})
    with pytest.raises(ConfigError, match="model_selection_mode"):
        config_from_dict({"training": {"model_selection_mode": "best"}})


def test_yaml_is_parsed_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("data: !!python/object/apply:os.system ['echo owned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


def test_missing_config_file_points_to_configs():
    with pytest.raises(ConfigError, match="configs/"):
        load_config("/nonexistent/config.yaml")


def test_float_written_integers_are_accepted():
    cfg = config_from_dict({"training": {"max_it": 4e6}})
    assert cfg.training.max_it == 4_000_000 and isinstance(cfg.training.max_it, int)


@pytest.mark.parametrize("section,key,value,message", [
    ("training", "batch_size", "abc", r"training.batch_size = 'abc': expected an integer \(the global batch"),
    ("training", "batch_size", 0, r"training.batch_size = 0: expected a value >= 1"),
    ("training", "peak_lr", "fast", r"training.peak_lr = 'fast': expected a number"),
    ("training", "grad_clip", -1.0, r"training.grad_clip = -1.0: expected a value >= 0.0"),
    ("training", "compile", "yes", r"training.compile = 'yes': expected true or false"),
    ("training", "precision", "fp16", r"training.precision = 'fp16': expected one of fp32, bf16"),
    ("training", "eval_batch_size", 2.5, r"training.eval_batch_size = 2.5: expected an integer"),
    ("training", "activation_checkpointing", {"decoder_ray_chunk": -8},
     r"training.activation_checkpointing.decoder_ray_chunk = -8: expected a value >= 0"),
    ("training", "activation_checkpointing", [1], r"'training.activation_checkpointing' must be a mapping"),
    ("model", "backend", "cuda", r"model.backend = 'cuda': expected one of eager, triton"),
    ("data", "num_points", "many", r"data.num_points = 'many': expected an integer"),
    ("data", "loader", "ffcv", r"data.loader = 'ffcv': expected one of torch, dali"),
    ("data", "kwargs", {"num_scenes": "lots"}, r"data.kwargs.num_scenes = 'lots': expected an integer"),
    ("data", "kwargs", {"height": 4}, r"data.kwargs.height = 4: expected a value >= 8 \(image height\)"),
])
def test_every_value_is_typed_and_named_in_errors(section, key, value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({section: {key: value}})


def test_numbers_yaml_reads_as_strings_are_the_numbers_meant(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  peak_lr: 1e-3\n  max_it: 4e6\n  grad_clip: 1\n")
    raw = yaml.safe_load(path.read_text())
    assert raw["training"]["peak_lr"] == "1e-3"          # YAML 1.1: a string
    t = load_config(str(path)).training
    assert t.peak_lr == 1e-3 and t.max_it == 4_000_000 and t.grad_clip == 1.0
    assert isinstance(t.grad_clip, float) and isinstance(t.max_it, int)


def test_typed_sections_and_no_mutation():
    raw = {"data": {"kwargs": {"num_scenes": 7.0}}, "model": {"backend": "eager"},
           "training": {"activation_checkpointing": {"slot_attention": True, "decoder_ray_chunk": 64}}}
    before = copy.deepcopy(raw)
    cfg = config_from_dict(raw)
    assert raw == before                                   # the caller's dict is left alone
    assert cfg.data.kwargs == {"num_scenes": 7} and isinstance(cfg.data.kwargs["num_scenes"], int)
    ac = cfg.training.activation_checkpointing
    assert (ac.encoder_blocks, ac.slot_attention, ac.decoder_ray_chunk) == (False, True, 64)
    assert ac.enabled() == {"slot_attention": True, "decoder_ray_chunk": 64}
    # A model built from a config has its own copy: switching its backend leaves cfg alone.
    from osrt_fast import OSRT
    from conftest import tiny_model_config
    cfg = config_from_dict({"model": tiny_model_config()})
    model = OSRT(cfg.model).set_backend("triton")
    assert model.cfg.backend == "triton" and cfg.model.backend == "eager"
