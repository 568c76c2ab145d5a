"""Typed configuration: the reference's YAML layout (`data`, `model`, `training`), checked once.

A reference run directory's `config.yaml` loads unchanged. Every key of every section has a type
and, where it matters, a range or a set of choices (`option` below); `config_from_dict` checks
them all when a config is built, and an error names the key, the value, what was expected and
what the key means. Unknown keys are an error that names the valid ones; YAML is always parsed
with the safe loader. YAML 1.1 reads `1e6` (no dot) as a string: a number written so is read as
the number meant. Building a config never changes the dict it came from, and `OSRT` copies the
model config it is given.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration file or section is malformed; the message says what to change."""


def option(default=dataclasses.MISSING, help: str = "", *, choices=None, min=None, max=None,
           default_factory=dataclasses.MISSING):
    """A config field with its meaning (`help`, quoted in errors) and its allowed values."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


BACKENDS = ("eager", "triton", "folded")
ENCODER_ATTENTION = ("sdpa", "xformers")
PRECISIONS = ("fp32", "bf16", "auto")
PARALLEL = ("fsdp", "ddp")
CACHED_DATASETS = ("procedural", "clevr3d", "obsurf_msn", "nmr", "posed")     # readers with a SceneCache

# data.kwargs per dataset: key -> (type, minimum or None, meaning). None as a value means "the
# dataset's default" for every key.
_FOLDER = {"max_objects": (int, 1, "skip scenes with more objects (the reference's filter)"),
           "downsample": (int, 0, "input views subsampled by 2**downsample"),
           "num_input_views": (int, 1, "views the encoder sees"),
           "max_views": (int, 1, "accepted, unused (as by the reference)")}
_GENERATOR = {"num_scenes": (int, 1, "scenes generated"), "height": (int, 8, "image height"),
              "width": (int, 8, "image width"), "num_views": (int, 1, "views per scene"),
              "min_objects": (int, 0, "fewest objects per scene"),
              "max_objects": (int, 1, "most objects per scene"), "seed": (int, None, "generator seed"),
              "device": (str, None, "where scenes are rendered: cpu, cuda, auto"),
              "zoom": (float, 0.5, "cameras closer by this factor: larger objects"),
              "background": (str, None, "'ground' (ground plane and sky) or 'plain' (one colour)"),
              "cameras": (str, None, "'random' (per scene) or 'fixed' (all scenes the same)")}
_KUBRIC = {"downsample": _FOLDER["downsample"], "num_input_views": _FOLDER["num_input_views"],
           "shuffle_buffer": (int, 0, "training stream shuffle buffer, in records"),
           "skip": (int, 0, "records skipped at the start"), "seed": (int, None, "input-view seed")}
DATASET_OPTIONS = {
    "procedural": {**_FOLDER, **_GENERATOR},
    "clevr3d": _FOLDER, "obsurf_msn": _FOLDER, "osrt": _KUBRIC, "msn": _KUBRIC,
    "nmr": {"downsample": _FOLDER["downsample"]},
    "shards": {"downsample": _FOLDER["downsample"], "num_input_views": _FOLDER["num_input_views"]},
    "posed": {"downsample": _FOLDER["downsample"], "num_input_views": _FOLDER["num_input_views"],
              "num_entities": (int, 1, "instance ids the masks hold, background included "
                                       "(default: transforms.json's, else the masks' largest + 1)")},
}


@dataclass
class DataConfig:
    dataset: str = option("procedural", "the dataset", choices=tuple(DATASET_OPTIONS))
    path: Optional[str] = option(None, "the dataset folder (default data/<dataset>)")
    num_points: int = option(2048, "target rays sampled per scene and training step", min=1)
    kwargs: dict = option(default_factory=dict, help="dataset options (docs/datasets.md)")
    loader: str = option("torch", "how training reads scenes: DataLoader workers, or NVIDIA DALI "
                                  "over png shards", choices=("torch", "dali"))
    cache: bool = option(False, "decode the training scenes into memory before the first step "
                                "and keep evaluation scenes once read, for folder datasets that "
                                "fit in RAM: no step decodes a file (the demo's 4500 training "
                                "scenes: about 75 MB, 3 s)")

    def resolved_path(self) -> str:
        return self.path if self.path is not None else os.path.join("data", self.dataset)


# -- the model's parts: the reference's `encoder_kwargs` / `decoder_kwargs`, typed ----------------
# A config file keeps the reference's flat layout (every key of a part in one mapping, the ray
# encoding's keys among them); `ModelConfig.encoder_config()` and `decoder_config()` read it into
# the dataclasses below, each key checked, and the modules of model.py take those.

class Checked:
    """A config dataclass whose fields are checked when it is made in code too (`build` checks
    them as they are read from a file, naming the file's key)."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f"{type(self).__name__}.{f.name}", getattr(self, f.name),
                                         hints[f.name], **f.metadata))


NUM_OCTAVES = 15          # the reference's octaves of each ray encoding
RAY_PARAMS = ("camera", "plucker")
CONV_INITS = ("default", "he")


@dataclass
class RayEncodingConfig(Checked):
    """How a ray becomes query features (model.RayEncoder): sines and cosines of the camera's
    position (or of the ray's moment) and of the ray's direction, in bands of octaves."""
    pos_start_octave: float = option(0.0, "the first octave of the position's encoding")
    pos_octaves: int = option(NUM_OCTAVES, "octaves of the position's encoding", min=1)
    ray_start_octave: float = option(0.0, "the first octave of the direction's encoding")
    ray_octaves: int = option(NUM_OCTAVES, "octaves of the direction's encoding", min=1)
    ray_param: str = option("camera", "what is encoded beside the direction: the camera position, "
                                      "or the ray's moment (Pluecker coordinates)", choices=RAY_PARAMS)

    @property
    def dim(self) -> int:
        """Features per ray: sine and cosine of 3 coordinates per octave, for both parts."""
        return 6 * (self.pos_octaves + self.ray_octaves)


RAY_KEYS = tuple(f.name for f in dataclasses.fields(RayEncodingConfig))


@dataclass
class SRTEncoderConfig(Checked):
    """The improved SRT encoder (model.ImprovedSRTEncoder): conv stem and transformer."""
    rays: RayEncodingConfig = option(default_factory=RayEncodingConfig, help="the ray encoding")
    num_conv_blocks: int = option(3, "stride-2 conv blocks of the stem", min=1)
    num_att_blocks: int = option(5, "transformer blocks", min=0)
    conv_dim: int = option(96, "the first conv block's width", min=1)
    latent_dim: int = option(768, "the set-latent tokens' width", min=1)
    num_heads: int = option(12, "attention heads", min=1)
    head_dim: int = option(64, "width of each head", min=1)
    mlp_dim: int = option(1536, "the transformer MLP's hidden width", min=1)
    image_mean: float = option(0.0, "images enter as (x - image_mean) / image_std")
    image_std: float = option(1.0, "images enter as (x - image_mean) / image_std (positive)")
    conv_init: str = option("default", "the stem's conv init: PyTorch's, or He-normal",
                            choices=CONV_INITS)

    def __post_init__(self):
        super().__post_init__()
        if self.image_std <= 0:
            raise _bad(f"{type(self).__name__}.image_std", self.image_std, "a positive number")

    @property
    def output_dim(self) -> int:
        return self.latent_dim


@dataclass
class OSRTEncoderConfig(SRTEncoderConfig):
    """OSRT's encoder (model.OSRTEncoder): the SRT encoder, then Slot Attention."""
    num_slots: int = option(6, "slots K", min=1)
    slot_dim: int = option(1536, "slot width D", min=1)
    slot_iters: int = option(1, "Slot Attention iterations", min=1)
    randomize_initial_slots: bool = option(False, "unsupported (the reference's option fails)")
    slot_mlp_dim: Optional[int] = option(None, "the slot MLP's hidden width (default 2 * slot_dim)",
                                         min=1)

    def __post_init__(self):
        super().__post_init__()
        if self.randomize_initial_slots:
            raise ConfigError("model.encoder_kwargs.randomize_initial_slots is not supported (the "
                              "reference's option has no noise scale and fails); set it to false")

    @property
    def output_dim(self) -> int:
        return self.slot_dim


@dataclass
class SlotMixerConfig(Checked):
    """OSRT's Slot Mixer decoder (model.SlotMixerDecoder)."""
    rays: RayEncodingConfig = option(default_factory=RayEncodingConfig, help="the ray encoding")
    num_att_blocks: int = option(2, "allocation-transformer blocks", min=0)
    layer_norm: bool = option(False, "LayerNorms in the mixing block")
    slot_dim: int = option(1536, "the slots' width", min=1)
    att_dim: Optional[int] = option(None, "the mixing attention's width (default slot_dim)", min=1)
    render_hidden_dim: Optional[int] = option(None, "the render MLP's width (default slot_dim)",
                                              min=1)
    num_heads: int = option(12, "allocation-transformer heads", min=1)

    @property
    def input_dim(self) -> int:
        return self.slot_dim


@dataclass
class SpatialBroadcastConfig(Checked):
    """The spatial-broadcast decoder (model.SpatialBroadcastDecoder)."""
    rays: RayEncodingConfig = option(default_factory=RayEncodingConfig, help="the ray encoding")
    slot_dim: int = option(1536, "the slots' width", min=1)
    hidden_dim: int = option(1536, "the render MLP's width", min=1)

    @property
    def input_dim(self) -> int:
        return self.slot_dim


@dataclass
class SRTDecoderConfig(Checked):
    """The improved SRT decoder (model.ImprovedSRTDecoder)."""
    rays: RayEncodingConfig = option(default_factory=RayEncodingConfig, help="the ray encoding")
    num_att_blocks: int = option(2, "allocation-transformer blocks", min=0)
    latent_dim: int = option(768, "the set-latents' width", min=1)
    render_hidden_dim: int = option(1536, "the render MLP's width", min=1)
    num_heads: int = option(12, "allocation-transformer heads", min=1)

    @property
    def input_dim(self) -> int:
        return self.latent_dim


ENCODER_CONFIGS = {"osrt": OSRTEncoderConfig, "srt": SRTEncoderConfig}
DECODER_CONFIGS = {"slot_mixer": SlotMixerConfig, "spatial_broadcast": SpatialBroadcastConfig,
                   "srt": SRTDecoderConfig}


def part_config(part: str, name: str, kwargs: Optional[dict]):
    """The typed config of model part `part` ('encoder' or 'decoder') of kind `name` from the
    reference's flat `<part>_kwargs` (the ray keys gathered into `rays`), every key checked."""
    registry = ENCODER_CONFIGS if part == "encoder" else DECODER_CONFIGS
    if name not in registry:
        raise ConfigError(f"unknown model.{part} {name!r}{nearest(name, registry)}; valid: "
                          f"{', '.join(registry)}")
    cls, flat = registry[name], dict(kwargs or {})
    valid = [f.name for f in dataclasses.fields(cls) if f.name != "rays"] + list(RAY_KEYS)
    unknown = sorted(set(flat) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown_keys_text(unknown, valid)} in "
                          f"model.{part}_kwargs for {part} {name!r}; valid keys: "
                          f"{', '.join(sorted(valid))}")
    rays = {k: flat.pop(k) for k in RAY_KEYS if k in flat}
    where = f"model.{part}_kwargs"
    typed = build(cls, flat, where)
    typed.rays = build(RayEncodingConfig, rays, where)
    return typed


@dataclass
class ModelConfig:
    """The reference's `model:` section. Its `*_kwargs` keep the file's flat form (so a config or
    checkpoint round-trips unchanged); `encoder_config()` / `decoder_config()` are their typed
    reading, which the model is built from."""
    encoder: str = option("osrt", "the encoder: osrt or srt")
    encoder_kwargs: dict = option(default_factory=dict, help="the encoder's widths and depths")
    decoder: str = option("slot_mixer", "the decoder: slot_mixer, spatial_broadcast or srt")
    decoder_kwargs: dict = option(default_factory=dict, help="the decoder's widths and depths")
    use_default_init: bool = option(False, "PyTorch's default initialisation instead of the paper's")
    backend: str = option("eager", "how the model is computed (the same function): eager "
                                   "everywhere; triton, the fast path's kernels, on CUDA GPUs; "
                                   "folded, the fast path's algebra in plain PyTorch, anywhere",
                          choices=BACKENDS)
    encoder_attention: str = option("sdpa", "the encoder's self-attention kernel",
                                    choices=ENCODER_ATTENTION)

    def encoder_config(self) -> SRTEncoderConfig:
        return part_config("encoder", self.encoder, self.encoder_kwargs)

    def decoder_config(self):
        return part_config("decoder", self.decoder, self.decoder_kwargs)

    def check(self) -> None:
        """What involves several keys of the section: each part's keys, and the widths the
        encoder hands the decoder."""
        enc, dec = self.encoder_config(), self.decoder_config()
        if enc.output_dim != dec.input_dim:
            width = "slot_dim" if hasattr(dec, "slot_dim") else "latent_dim"
            raise ConfigError(f"the encoder outputs {enc.output_dim}-d latents but the decoder "
                              f"expects {dec.input_dim}-d; set model.decoder_kwargs.{width} to "
                              f"{enc.output_dim}")


@dataclass
class CheckpointingConfig:
    """Regions recomputed in backward instead of kept (osrt_fast/parallel.py)."""
    encoder_blocks: bool = option(False, "the conv stem and each transformer block")
    slot_attention: bool = option(False, "slot attention")
    decoder_ray_chunk: int = option(0, "rays per scene per checkpointed decoder chunk (0 = off)", min=0)

    def enabled(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v}


@dataclass
class DivergenceConfig:
    """When a step's loss or gradient norm counts as a spike (osrt_fast/guards.py)."""
    loss_factor: float = option(5.0, "a loss above this times the median of the recent accepted "
                                     "losses is a spike (0 = off)", min=0.0)
    grad_norm_factor: float = option(0.0, "a gradient norm above this times the recent median "
                                          "is a spike (0 = off)", min=0.0)
    window: int = option(100, "accepted steps the medians are taken over", min=1)
    max_spikes: int = option(5, "spikes in a row (each skipped) that stop the run", min=1)


@dataclass
class TrainingConfig:
    batch_size: int = option(256, "the global batch: scenes per optimizer step", min=1)
    num_workers: int = option(1, "DataLoader workers per process", min=0)
    model_selection_metric: str = option("psnr", "the evaluation metric model_best.pt is chosen by",
                                         choices=("psnr", "mse", "ari", "fg_ari"))
    model_selection_mode: str = option("maximize", "whether a larger metric is better",
                                       choices=("maximize", "minimize"))
    print_every: int = option(10, "steps between logs (0 = never)", min=0)
    visualize_every: int = option(5000, "steps between visualisations (0 = never)", min=0)
    validate_every: int = option(5000, "steps between evaluations (0 = never)", min=0)
    checkpoint_every: int = option(1000, "steps between model.pt saves (0 = only at the end)", min=0)
    backup_every: int = option(25000, "steps between model_<it>.pt backups (0 = never)", min=0)
    max_it: int = option(4_000_000, "training steps", min=0)
    decay_it: int = option(4_000_000, "steps per learning-rate decay by decay_rate", min=1)
    lr_warmup: int = option(2500, "linear learning-rate warm-up steps", min=0)
    peak_lr: float = option(1e-4, "the learning rate after warm-up", min=0.0)
    decay_rate: float = option(0.16, "learning-rate decay per decay_it steps", min=0.0)
    lr_cooldown: int = option(0, "the last N steps before max_it scale the learning rate linearly "
                                 "to 0 (a warm-up-stable-decay schedule's cooldown, MiniCPM, "
                                 "arXiv:2404.06395; 0 = off, as the reference)", min=0)
    seed: int = option(0, "the seed of weights, batches and ray samples")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    max_nonfinite_steps: int = option(5, "non-finite losses in a row that stop the run", min=1)
    collective_timeout_s: float = option(1800.0, "with several processes: seconds a process waits "
                                                 "for the others at a collective before the run "
                                                 "stops, naming the wait (a hung process)",
                                         min=1.0)
    divergence: DivergenceConfig = option(
        default_factory=DivergenceConfig,
        help="e.g. {loss_factor: 5, grad_norm_factor: 0, window: 100, max_spikes: 5}")
    eval_batch_size: Optional[int] = option(None, "scenes per evaluation batch (default "
                                                  "batch_size // 8)", min=1)
    vis_scenes: int = option(6, "scenes in the visualisation grids", min=1)
    precision: str = option("fp32", "bf16: the forward pass under bf16 autocast, fp32 weights and "
                                    "Adam state; auto: bf16 where the device computes it natively "
                                    "(a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32",
                            choices=PRECISIONS)
    grad_clip: float = option(0.0, "clip the global gradient norm to this (0 = off)", min=0.0)
    slot_balance: float = option(0.0, "weight of the slot-importance loss (the squared coefficient "
                                      "of variation of each scene's slot shares; Shazeer et al. "
                                      "2017) added to the MSE against the one-slot collapse of "
                                      "the Slot Mixer (0 = off, the reference)", min=0.0)
    slot_balance_until: int = option(0, "steps over which slot_balance falls linearly to 0 "
                                        "(0 = it stays at slot_balance)", min=0)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    activation_checkpointing: CheckpointingConfig = option(
        default_factory=CheckpointingConfig,
        help="e.g. {encoder_blocks: true, slot_attention: true, decoder_ray_chunk: 1024}")
    compile: bool = option(False, "torch.compile each region (fullgraph)")
    parallel: str = option("fsdp", "with several processes: FSDP2 or DDP", choices=PARALLEL)
    peak_tflops: Optional[float] = option(None, "the device's dense bf16 peak for MFU", min=0.0)
    # The reference's NeRF decoder keys: accepted so its configs load, unused by OSRT.
    num_coarse_samples: Optional[int] = option(None, "unused (the reference's NeRF decoder)")
    num_fine_samples: Optional[int] = option(None, "unused (the reference's NeRF decoder)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig}


# ----------------------------------------------------------------------------------------------
# Checking

def _bad(where: str, value, expected: str, help: str = "") -> ConfigError:
    return ConfigError(f"{where} = {value!r}: expected {expected}" + (f" ({help})" if help else ""))


def _number(value):
    """A YAML string that spells a number (`1e6`, `4e6`) as that number; anything else as is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def coerce(where: str, value, kind, *, help: str = "", choices=None, min=None, max=None):
    """`value` as `kind` (bool, int, float, str, dict, a config dataclass, or Optional of one),
    checked against `choices` and the inclusive range [min, max]; a ConfigError otherwise."""
    if typing.get_origin(kind) is typing.Union:
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if dataclasses.is_dataclass(kind):
        return build(kind, value, where)
    if kind is bool:
        if not isinstance(value, bool):
            raise _bad(where, value, "true or false", help)
    elif kind is int:
        value = _number(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)              # YAML writes 4e6 as a float
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, value, "an integer", help)
    elif kind is float:
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(where, value, "a number", help)
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise _bad(where, value, "a string", help)
    elif kind is dict:
        value = {} if value is None else value
        if not isinstance(value, dict):
            raise _bad(where, value, "a mapping", help)
        return copy.deepcopy(value)
    if choices is not None and value not in choices:
        raise _bad(where, value, f"one of {', '.join(map(str, choices))}", help)
    if min is not None and value < min:
        raise _bad(where, value, f"a value >= {min}", help)
    if max is not None and value > max:
        raise _bad(where, value, f"a value <= {max}", help)
    return value


def closest(word: str, choices) -> Optional[str]:
    """The one of `choices` nearest to a mistyped `word`, if one is close."""
    import difflib
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return close[0] if close else None


def nearest(word: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices` to a mistyped `word`, or ''."""
    near = closest(word, choices)
    return f" (did you mean {near!r}?)" if near else ""


def unknown_keys_text(unknown, valid, where: str = "") -> str:
    """"'where.a' (did you mean 'c'?), 'where.b'" for the keys `unknown`, each with the nearest of
    `valid` where one is close."""
    return ", ".join(repr(f"{where}.{k}" if where else k) + nearest(k, valid) for k in unknown)


def build(cls, values: Any, where: str):
    """A `cls` (a config dataclass) from a mapping, every field checked (see `coerce`)."""
    if values is None:
        values = {}
    if isinstance(values, cls):
        values = dataclasses.asdict(values)
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{where}' must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown_keys_text(unknown, fields, where)}; "
            f"valid keys in '{where}' are: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: coerce(f"{where}.{name}", value, hints[name], **fields[name].metadata)
              for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:          # a Checked class's own check: name the key as read
        raise ConfigError(str(e).replace(f"{cls.__name__}.", f"{where}.")) from None


def checked_data_kwargs(dataset: str, kwargs: Optional[dict]) -> dict:
    """data.kwargs for `dataset`, every key known to it and of its type."""
    if dataset not in DATASET_OPTIONS:
        raise _bad("data.dataset", dataset, f"one of {', '.join(DATASET_OPTIONS)}")
    valid = DATASET_OPTIONS[dataset]
    unknown = sorted(set(kwargs or {}) - set(valid))
    if unknown:
        raise ConfigError(f"unknown data.kwargs key(s) {unknown_keys_text(unknown, valid)} for "
                          f"dataset '{dataset}'; valid keys are: {', '.join(valid)}")
    return {key: coerce(f"data.kwargs.{key}", value, Optional[valid[key][0]], min=valid[key][1],
                        help=valid[key][2])
            for key, value in (kwargs or {}).items()}


def validate(cfg: Config) -> None:
    """What involves several keys."""
    cfg.data.kwargs = checked_data_kwargs(cfg.data.dataset, cfg.data.kwargs)
    cfg.model.check()
    if cfg.data.cache and cfg.data.dataset not in CACHED_DATASETS:
        raise ConfigError(f"data.cache keeps decoded scenes of the folder datasets "
                          f"({', '.join(CACHED_DATASETS)}) in memory; {cfg.data.dataset!r} "
                          f"cannot (shards are memory-mapped, MSN-Hard is a stream): set "
                          f"data.cache: false")
    if cfg.data.loader == "dali" and cfg.data.dataset != "shards":
        raise ConfigError("data.loader 'dali' reads png shards: convert the dataset first "
                          "(python -m osrt_fast.data.shards CONFIG --out DIR --encoding png) "
                          "and set data.dataset: shards, data.path: DIR")


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
    cfg = Config(**{name: build(cls, raw.get(name), name) for name, cls in _SECTIONS.items()})
    validate(cfg)
    return cfg


def model_config_from_any(model_cfg: Any) -> ModelConfig:
    """A checked copy of a ModelConfig, a reference-style `model:` dict, or a whole Config's model."""
    if isinstance(model_cfg, Config):
        model_cfg = model_cfg.model
    checked = build(ModelConfig, model_cfg, "model")
    checked.check()
    return checked


def micro_batch_size(t: TrainingConfig, world_size: int) -> int:
    """Scenes per process per forward pass: the global batch over processes and accumulation steps."""
    parts = world_size * t.grad_accum
    if t.batch_size % parts:
        raise ConfigError(
            f"training.batch_size {t.batch_size} (the global batch) does not split evenly over "
            f"{world_size} process(es) x grad_accum {t.grad_accum}; use a batch size divisible by "
            f"{parts} (e.g. {max(parts, t.batch_size - t.batch_size % parts)}) or change grad_accum")
    return t.batch_size // parts


def similar_file(path: str) -> str:
    """' (did you mean X?)' for the file of `path`'s folder whose name is nearest to its own."""
    folder = os.path.dirname(path) or "."
    try:
        names = [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))]
    except OSError:
        return ""
    near = closest(os.path.basename(path), names)
    return f" (did you mean '{os.path.join(os.path.dirname(path), near)}'?)" if near else ""


def load_config(path: str) -> Config:
    """Reads a YAML config (safe loader) into a checked Config."""
    if os.path.isdir(path):
        inside = os.path.join(path, "config.yaml")
        raise ConfigError(f"'{path}' is a folder, not a config file: pass a config file"
                          + (f" ({inside}, the run folder's)" if os.path.isfile(inside) else
                             ", such as configs/demo.yaml"))
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist{similar_file(path)}; the configs "
                          "shipped with osrt-fast are in configs/ (e.g. configs/demo.yaml)")
    with open(path, "r") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    try:
        cfg = config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    find_relative_data(cfg, path)
    return cfg


def find_relative_data(cfg: Config, config_path: str, levels: int = 3) -> None:
    """A relative data.path names a folder under the current one (as in the reference). Where the
    current folder has no such path but the config's folder or one of the `levels` above it has
    (a clone's configs/*.yaml, a run's runs/<name>/config.yaml, used from another folder), that
    one is used, and a line says so: a command started elsewhere finds the data it was trained
    on instead of generating a second copy."""
    relative = cfg.data.resolved_path()
    if os.path.isabs(relative) or os.path.exists(relative):
        return
    here = os.path.dirname(os.path.abspath(config_path))
    for _ in range(levels + 1):
        candidate = os.path.join(here, relative)
        if os.path.exists(candidate):
            cfg.data.path = candidate
            print(f"note: data.path '{relative}' is not in the current folder; using {candidate}, "
                  f"found from the config's folder")
            return
        here = os.path.dirname(here)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
