import glob
import os

import pytest

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
