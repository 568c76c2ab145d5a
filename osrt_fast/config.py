"""Typed configuration: the reference's YAML layout (`data`, `model`, `training`), checked.

A reference run directory's `config.yaml` loads unchanged. Unknown keys are an error that names
the key and the valid ones; YAML is always parsed with the safe loader.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration file or section is malformed; the message says what to change."""


@dataclass
class DataConfig:
    # 'procedural' (built-in generator), 'clevr3d', 'obsurf_msn', 'osrt' / 'msn' (MSN-Hard), 'nmr'
    dataset: str = "procedural"
    # Dataset folder; the reference's default is data/<dataset>.
    path: Optional[str] = None
    # Target rays sampled per scene and training step.
    num_points: int = 2048
    # Dataset-specific keyword arguments (e.g. downsample, max_objects, num_input_views, and for
    # 'procedural' the generator settings num_scenes, height, width, num_views, ...).
    kwargs: dict = field(default_factory=dict)
    # How training reads scenes: 'torch' (DataLoader workers) or 'dali' (png shards decoded by
    # NVIDIA DALI's threads; `dataset: shards` converted with --encoding png; [dali] extra).
    loader: str = "torch"

    def resolved_path(self) -> str:
        return self.path if self.path is not None else os.path.join("data", self.dataset)


@dataclass
class ModelConfig:
    encoder: str = "osrt"            # 'osrt' | 'srt'
    encoder_kwargs: dict = field(default_factory=dict)
    decoder: str = "slot_mixer"      # 'slot_mixer' | 'spatial_broadcast' | 'srt'
    decoder_kwargs: dict = field(default_factory=dict)
    # The reference's switch to PyTorch's default initialisation instead of the paper's.
    use_default_init: bool = False
    # Which implementation computes the model: 'eager' is the definition and runs everywhere;
    # 'triton' runs slot attention and the Slot Mixer decoder through the fused Triton kernels
    # (CUDA; the [triton] extra). Both compute the same function from the same parameters.
    backend: str = "eager"
    # The encoder's self-attention: 'sdpa' (PyTorch's scaled_dot_product_attention) or
    # 'xformers' (memory-efficient attention; CUDA and the [xformers] extra).
    encoder_attention: str = "sdpa"


@dataclass
class TrainingConfig:
    batch_size: int = 256
    num_workers: int = 1
    model_selection_metric: str = "psnr"
    model_selection_mode: str = "maximize"
    print_every: int = 10
    visualize_every: int = 5000
    validate_every: int = 5000
    checkpoint_every: int = 1000
    backup_every: int = 25000
    max_it: int = 4_000_000
    decay_it: int = 4_000_000
    lr_warmup: int = 2500
    # Options beyond the reference (the reference's values are the defaults).
    peak_lr: float = 1e-4
    decay_rate: float = 0.16
    seed: int = 0
    device: str = "auto"             # 'auto' | 'cpu' | 'cuda' | 'cuda:N'
    max_nonfinite_steps: int = 5     # stop after this many non-finite losses in a row
    eval_batch_size: Optional[int] = None   # default: max(1, batch_size // 8), as the reference
    vis_scenes: int = 6               # scenes in the visualisation grids
    # Scale (osrt_fast/parallel.py). `batch_size` is the global batch: scenes per optimizer
    # step over all processes and accumulation steps together, whatever the process count.
    precision: str = "fp32"          # 'fp32' | 'bf16' (bf16 autocast; fp32 weights and Adam state)
    grad_clip: float = 0.0           # clip the global gradient norm to this; 0 = off
    grad_accum: int = 1              # micro-batches per optimizer step (per process)
    # Regions recomputed in backward instead of kept: {encoder_blocks: bool (conv stem and each
    # transformer block), slot_attention: bool, decoder_ray_chunk: rays per scene per chunk (0 = off)}
    activation_checkpointing: dict = field(default_factory=dict)
    compile: bool = False            # torch.compile each region (fullgraph)
    parallel: str = "fsdp"           # with several processes (torchrun): 'fsdp' (FSDP2) | 'ddp'
    peak_tflops: Optional[float] = None   # the device's dense bf16 peak for MFU (default: known GPUs)
    # Reference keys for its NeRF decoder; accepted so its configs load, unused by OSRT.
    num_coarse_samples: Optional[int] = None
    num_fine_samples: Optional[int] = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig}


def _build(cls, values: Any, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{where}' must be a mapping, got {type(values).__name__}")
    valid = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(f'{where}.{k}') for k in unknown)}; "
            f"valid keys in '{where}' are: {', '.join(sorted(valid))}")
    kwargs = {}
    for name, value in values.items():
        default = valid[name].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"'{where}.{name}' must be true or false, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) \
                and value.is_integer():
            value = int(value)   # YAML writes 4e6 as a float
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if valid[name].default_factory is dict and value is None:  # type: ignore[comparison-overlap]
            value = {}
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(raw: Any) -> Config:
    """Builds a checked Config from a dict with (some of) the sections data, model, training."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping with sections {sorted(_SECTIONS)}, "
                          f"got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid sections are: "
                          f"{', '.join(sorted(_SECTIONS))}")
    cfg = Config(**{name: _build(cls, raw.get(name), name) for name, cls in _SECTIONS.items()})
    validate(cfg)
    return cfg


def model_config_from_any(model_cfg: Any) -> ModelConfig:
    """Accepts a ModelConfig, a reference-style `model:` dict, or a whole Config."""
    if isinstance(model_cfg, ModelConfig):
        return model_cfg
    if isinstance(model_cfg, Config):
        return model_cfg.model
    return _build(ModelConfig, model_cfg, "model")


def validate(cfg: Config) -> None:
    t = cfg.training
    if t.model_selection_mode not in ("maximize", "minimize"):
        raise ConfigError("training.model_selection_mode must be 'maximize' or 'minimize', "
                          f"got {t.model_selection_mode!r}")
    if t.batch_size < 1:
        raise ConfigError(f"training.batch_size must be positive, got {t.batch_size}")
    if cfg.data.num_points < 1:
        raise ConfigError(f"data.num_points must be positive, got {cfg.data.num_points}")
    check_model_choices(cfg.model)
    check_scale_options(t)
    if not isinstance(cfg.data.kwargs, dict):
        raise ConfigError("data.kwargs must be a mapping")
    if cfg.data.loader not in ("torch", "dali"):
        raise ConfigError(f"data.loader must be 'torch' or 'dali', got {cfg.data.loader!r}")
    if cfg.data.loader == "dali" and cfg.data.dataset != "shards":
        raise ConfigError("data.loader 'dali' reads png shards: convert the dataset first "
                          "(python -m osrt_fast.data.shards CONFIG --out DIR --encoding png) "
                          "and set data.dataset: shards, data.path: DIR")


PRECISIONS = ("fp32", "bf16")
PARALLEL = ("fsdp", "ddp")
CHECKPOINT_REGIONS = {"encoder_blocks": bool, "slot_attention": bool, "decoder_ray_chunk": int}


def check_scale_options(t: "TrainingConfig") -> None:
    if t.precision not in PRECISIONS:
        raise ConfigError(f"training.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if t.parallel not in PARALLEL:
        raise ConfigError(f"training.parallel must be one of {', '.join(PARALLEL)}, got {t.parallel!r}")
    if not isinstance(t.grad_accum, int) or t.grad_accum < 1:
        raise ConfigError(f"training.grad_accum must be a positive integer, got {t.grad_accum!r}")
    if t.grad_clip < 0:
        raise ConfigError(f"training.grad_clip must be >= 0 (0 turns clipping off), got {t.grad_clip}")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ConfigError(f"training.peak_tflops must be positive, got {t.peak_tflops}")
    ac = t.activation_checkpointing
    if not isinstance(ac, dict):
        raise ConfigError("training.activation_checkpointing must be a mapping, e.g. "
                          "{encoder_blocks: true, slot_attention: true, decoder_ray_chunk: 1024}")
    unknown = sorted(set(ac) - set(CHECKPOINT_REGIONS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in training.activation_checkpointing; valid "
                          f"keys are: {', '.join(CHECKPOINT_REGIONS)}")
    for key, kind in CHECKPOINT_REGIONS.items():
        value = ac.get(key, kind())
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"training.activation_checkpointing.{key} must be true or false, got {value!r}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"training.activation_checkpointing.{key} must be a number of rays "
                              f"per scene (0 = off), got {value!r}")


def micro_batch_size(t: "TrainingConfig", world_size: int) -> int:
    """Scenes per process per forward pass: the global batch over processes and accumulation steps."""
    parts = world_size * t.grad_accum
    if t.batch_size % parts:
        raise ConfigError(
            f"training.batch_size {t.batch_size} (the global batch) does not split evenly over "
            f"{world_size} process(es) x grad_accum {t.grad_accum}; use a batch size divisible by "
            f"{parts} (e.g. {max(parts, t.batch_size - t.batch_size % parts)}) or change grad_accum")
    return t.batch_size // parts


BACKENDS = ("eager", "triton")
ENCODER_ATTENTION = ("sdpa", "xformers")


def check_model_choices(model: ModelConfig) -> None:
    if model.backend not in BACKENDS:
        raise ConfigError(f"model.backend must be one of {', '.join(BACKENDS)}, got {model.backend!r}")
    if model.encoder_attention not in ENCODER_ATTENTION:
        raise ConfigError(f"model.encoder_attention must be one of {', '.join(ENCODER_ATTENTION)}, "
                          f"got {model.encoder_attention!r}")


def load_config(path: str) -> Config:
    """Reads a YAML config (safe loader) into a checked Config."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist; the configs shipped with "
                          "osrt-fast are in configs/ (e.g. configs/demo.yaml)")
    with open(path, "r") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
