"""Datasets: every loader yields scene records (`records.py`); `make_batch` builds model inputs
on the device, as a `BatchSpec` says (target rays, downsampling: `batch_spec(data_cfg, dataset)`).

    dataset      loader                    format
    procedural   obsurf.ObSuRFDataset      built-in scenes in the ObSuRF layout (generated)
    clevr3d      obsurf.ObSuRFDataset      CLEVR3D, ObSuRF layout
    obsurf_msn   obsurf.ObSuRFDataset      ObSuRF-MSN ("MSN-Easy"), ObSuRF layout
    osrt / msn   kubric.KubricDataset      MSN-Hard, Kubric TFDS folder (msn: without masks)
    nmr          nmr.NMRDataset            NMR (SRT's format)
    shards       shards.ShardDataset       pre-decoded shards of any of the above (`shards.py`)
    posed        posed.PosedDataset        your own scenes: folders with transforms.json
"""
from __future__ import annotations

import os
from typing import Optional

from ..config import checked_data_kwargs
from .errors import CorruptFile, DataError, DataWarning, SkipCounter
from .obsurf import GENERATE_HINT, KINDS, SPLIT_RANGES, ObSuRFDataset, procedural_split_range
from .loaders import (first_records, is_stream, loader_kwargs, loader_options, record_loader,
                      scene_records, training_loaders, worker_init, worker_init_fn)
from .records import (ENCODER_MULTIPLE, BatchSpec, ViewPolicy, check_input_size, collate,
                      make_batch, model_batch, sample_pixels, to_device)
from .samplers import EVAL_SEED, FixedSampler, ResumableBatchSampler, item_seed

GENERATOR_DEFAULTS = dict(num_scenes=1000, height=64, width=64, num_views=4, min_objects=2,
                          max_objects=6, seed=0, device="cpu", zoom=1.0, background="ground",
                          cameras="random")


def _ensure_procedural(path: str, kwargs: dict, downsample: Optional[int]) -> None:
    """Generates the built-in dataset at `path` if its metadata.npz is missing; checks that an
    existing one matches the generator settings the config names explicitly. DataError if the
    settings are invalid, generator.json is damaged, or another process is generating there."""
    from osrt_fast import scenes
    settings = {k: kwargs.get(k, d) for k, d in GENERATOR_DEFAULTS.items()}
    if os.path.isfile(os.path.join(path, "metadata.npz")):
        old = scenes.read_settings(path)
        if old is not None:
            # Where the data was rendered does not change it.
            recorded = {k: old.get(k, d) for k, d in GENERATOR_DEFAULTS.items()}
            differ = {k: (recorded[k], kwargs[k]) for k in kwargs
                      if k in recorded and k != "device" and recorded[k] != kwargs[k]}
            if differ:
                raise DataError(
                    f"'{path}' holds procedural data generated with other settings "
                    f"(existing vs config: {differ}). Delete the folder to re-generate, or set "
                    f"data.path to another folder.")
        return
    # the size batch_spec will refuse, refused before minutes of generating it
    check_input_size(settings["height"], settings["width"], downsample,
                     "data.kwargs height and width, such as 32, 64 or 128")
    print(f"osrt_fast.data: '{path}' has no metadata.npz; generating the procedural dataset "
          f"there ({settings['num_scenes']} scenes, {settings['num_views']} views of "
          f"{settings['width']}x{settings['height']}, {settings['min_objects']}-"
          f"{settings['max_objects']} objects, seed {settings['seed']}"
          f"{'' if settings['zoom'] == 1.0 else ', zoom ' + str(settings['zoom'])}"
          f"{'' if settings['background'] == 'ground' else ', background ' + settings['background']}"
          f"{'' if settings['cameras'] == 'random' else ', cameras ' + settings['cameras']}"
          f", device "
          f"{settings['device']}). This runs once; later runs reuse it.", flush=True)
    scenes.generate_dataset(path, **settings)


def get_dataset(split: str, data_cfg, max_len: Optional[int] = None):
    """The dataset `data_cfg.dataset` for split 'train' / 'val' / 'test' (world coordinates).

    data_cfg: a `config.DataConfig`. See the module docstring for the datasets; the folder is
    data_cfg.path (default data/<dataset>); 'procedural' is generated there on first use.
    Items are scene records; `make_batch(records, batch_spec(data_cfg, dataset))` gives the
    model's inputs.
    """
    name = data_cfg.dataset
    kwargs = checked_data_kwargs(name, data_cfg.kwargs)     # (a hand-made DataConfig too)
    path = data_cfg.resolved_path()
    downsample = kwargs.pop("downsample", None)             # batch_spec's, not the reader's
    common = dict(max_len=max_len)
    if name in ("osrt", "msn"):
        from .kubric import KubricDataset
        return KubricDataset(path, split, masks=name == "osrt", **common, **kwargs)
    if name == "nmr":
        from .nmr import NMRDataset
        return cached(NMRDataset(path, split, **common, **kwargs), data_cfg)
    if name == "shards":
        from .shards import ShardDataset
        return ShardDataset(path, split, **common, **kwargs)
    if name == "posed":
        from .posed import PosedDataset
        return cached(PosedDataset(path, split, **common, **kwargs), data_cfg)
    kwargs.pop("max_views", None)   # accepted and ignored, as by the reference
    if name == "procedural":
        _ensure_procedural(path, kwargs, downsample)
        for k in GENERATOR_DEFAULTS:
            if k != "max_objects":
                kwargs.pop(k, None)
    return cached(ObSuRFDataset(path, split, kind=name, **common, **kwargs), data_cfg)


def scenes_and_views(dataset) -> str:
    """' (S scenes, each with V choices of input views)' for a split whose items are its scenes
    seen from several choices of input views (the folder readers), else ''."""
    scenes = getattr(dataset, "num_scenes", None)
    if not scenes or len(dataset) == scenes or len(dataset) % scenes:
        return ""
    return f" ({scenes} scenes, each with {len(dataset) // scenes} choices of input views)"


def cached(dataset, data_cfg):
    """`dataset` keeping its decoded scenes in memory where data_cfg.cache asks (SceneCache)."""
    if data_cfg.cache:
        dataset.cache = {}
    return dataset


def batch_spec(data_cfg, dataset, full_scale: bool = False) -> BatchSpec:
    """How a run with data config `data_cfg` batches `dataset`'s records: data_cfg.num_points
    target rays per scene (every pixel of every target view with `full_scale`, as evaluation
    at full scale), input views subsampled by 2**data.kwargs.downsample. DataError if the
    dataset's views, so subsampled, do not fit the encoder."""
    kwargs = checked_data_kwargs(data_cfg.dataset, data_cfg.kwargs)
    return BatchSpec.for_dataset(dataset, data_cfg.num_points, full_scale,
                                 kwargs.get("downsample"))
