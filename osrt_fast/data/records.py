"""Scene records: the one item format every loader produces, and the device-side batch builder.

A loader does no per-pixel work. Each item is a *scene record* of numpy arrays, as stored:

    images        uint8   [V, H, W, 3]   every view of the scene
    ids           uint8   [V, H, W]      slot index per pixel, 0 = background (absent for
                                         datasets without instance masks, e.g. NMR)
    origins       float32 [V, 3]         camera centres (world frame)
    ray_mats      float32 [V, 3, 3]      pixel -> ray map: the ray through pixel (row y, column
                                         x) points along normalize(M @ [x + 0.5, y + 0.5, 1])
    input_views   int64   [V_in]         which views the encoder sees
    target_views  int64   [V_t]          which views target rays are drawn from
    seed          int64                  target-ray sampling seed
    sceneid       int64

Records collate with `torch.utils.data.default_collate` (uint8 stays uint8, so a scene of
MSN-Hard is 0.65 MB to copy), and `make_batch` turns a batch of them, on the training device,
into the model's inputs: it gathers input views, downsamples, computes rays, samples target
rays and one-hot encodes masks, all as batched tensor operations.

Target rays are drawn without replacement (with replacement only if there are fewer candidate
pixels than asked, as the reference). The draw is a function of (seed, pixel) alone, through a
counter-based hash, so an item's rays do not depend on its batch, the batch size or the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..cameras import matrix_rays
from .errors import CorruptFile, DataError


ENCODER_MULTIPLE = 8       # the encoder's stride: input views' sides must be multiples of it


def downsample_stride(num_steps: Optional[int]) -> int:
    """s of the reference's subsampling x[s//2::s]: 2**num_steps, 1 (none) for None or < 1."""
    return 1 if num_steps is None or num_steps < 1 else 2 ** num_steps


def downsampled_len(n: int, num_steps: Optional[int]) -> int:
    """Pixels left of n by the reference's subsampling x[s//2::s], s = 2**num_steps."""
    stride = downsample_stride(num_steps)
    return len(range(stride // 2, n, stride))


def check_input_size(height: int, width: int, downsample: Optional[int],
                     hint: Optional[str] = None) -> tuple:
    """(h, w) of input views of height x width images after downsampling; DataError unless both
    are multiples of ENCODER_MULTIPLE. `hint` names sizes that work (default: the downsample
    values these images work with, if any)."""
    h, w = downsampled_len(height, downsample), downsampled_len(width, downsample)
    if h % ENCODER_MULTIPLE or w % ENCODER_MULTIPLE:
        def nearest(n):
            return ENCODER_MULTIPLE * max(1, -(-n // ENCODER_MULTIPLE))   # round up
        if hint is None:
            fits = [str(d) for d in (None, 1, 2, 3, 4)
                    if not (downsampled_len(height, d) % ENCODER_MULTIPLE
                            or downsampled_len(width, d) % ENCODER_MULTIPLE)]
            hint = (f"{width}x{height} images work with downsample {', '.join(fits)}" if fits
                    else f"no downsample makes {width}x{height} images fit")
        raise DataError(
            f"input images are {w}x{h} (width x height; files {width}x{height}, "
            f"downsample={downsample}), but the encoder needs both sides to be multiples "
            f"of {ENCODER_MULTIPLE}. Use images of e.g. {nearest(w)}x{nearest(h)} after "
            f"downsampling ({hint}), or change downsample.")
    return h, w


@dataclass(frozen=True)
class BatchSpec:
    """How `make_batch` turns records into model inputs.

    num_points: target rays per scene; full_scale: every pixel of every target view instead;
    downsample: input views (images, rays, masks) subsampled by 2**downsample, as the
    reference's `x[s//2::s, s//2::s]` (targets never are); num_entities: one-hot mask channels
    (0: the dataset has no masks).

    A dataset holds scenes only; how they are batched is the caller's (a run's config:
    `osrt_fast.data.batch_spec`), checked against the dataset by `for_dataset`.
    """
    num_points: int = 2048
    full_scale: bool = False
    downsample: Optional[int] = None
    num_entities: int = 0

    @classmethod
    def for_dataset(cls, dataset, num_points: int = 2048, full_scale: bool = False,
                    downsample: Optional[int] = None) -> "BatchSpec":
        """The spec for batches of `dataset`'s records, with its mask channels
        (`dataset.num_entities`); DataError if its views (`dataset.height` x `dataset.width`,
        None when a stream's size is unknown until read), subsampled by 2**downsample, do not
        fit the encoder."""
        if dataset.height is not None:
            check_input_size(dataset.height, dataset.width, downsample)
        return cls(int(num_points), bool(full_scale), downsample, int(dataset.num_entities))


@dataclass(frozen=True)
class ViewPolicy:
    """Which views of a scene an item uses, as the reference's loaders choose them.

    inputs 'cyclic': a dataset of n scenes has n * V items; item i is scene i mod n with input
        views (i div n + j) mod V, j < num_input_views (ObSuRF / CLEVR3D, NMR);
    inputs 'random': one item per scene, num_input_views views drawn at random without
        replacement (MSN-Hard);
    targets 'all': target rays from every view (ObSuRF / CLEVR3D); 'others': from the views
        that are not inputs (NMR, MSN-Hard).
    """
    inputs: str = "cyclic"
    num_input_views: int = 1
    targets: str = "all"

    def __post_init__(self):
        if self.inputs not in ("cyclic", "random") or self.targets not in ("all", "others"):
            raise DataError(f"unknown view policy {self}: inputs is 'cyclic' or 'random', "
                            f"targets 'all' or 'others'")

    def items_per_scene(self, num_views: int) -> int:
        return num_views if self.inputs == "cyclic" else 1

    def choose(self, index: int, num_scenes: int, num_views: int, rng=None):
        """(scene position in [0, num_scenes), input views [V_in], target views [V_t]) of item
        `index`; rng (a numpy Generator) is used by 'random' inputs only."""
        k = self.num_input_views
        if not 1 <= k <= num_views - (self.targets == "others"):
            raise DataError(f"num_input_views={k} does not fit {num_views} views per scene"
                            + (" with targets from the other views" if self.targets == "others"
                               else ""))
        if self.inputs == "cyclic":
            scene, first = index % num_scenes, (index // num_scenes) % num_views
            inputs = (first + np.arange(k)) % num_views
        else:
            scene = index % num_scenes
            rng = np.random.default_rng() if rng is None else rng
            inputs = rng.choice(num_views, size=k, replace=False)
        if self.targets == "all":
            targets = np.arange(num_views)
        else:
            targets = np.setdiff1d(np.arange(num_views), inputs)
        return scene, inputs.astype(np.int64), targets.astype(np.int64)

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "num_input_views": self.num_input_views,
                "targets": self.targets}


# ----------------------------------------------------------------------------------------------
# Counter-based sampling

_M64 = 1 << 64


class SceneCache:
    """Mixin of the readers that decode a scene's files (`_read_scene(scene)`): with `cache` set
    to a dict (`data.cache`), each scene is kept in memory once decoded, so later epochs read
    nothing; the trainer fills the training set's at once (`fill_cache`), before loader
    processes start (they inherit it). Callers must not change what `_load_scene` returns (the
    readers stack it into new arrays)."""

    cache: Optional[dict] = None

    def _load_scene(self, scene: int):
        if self.cache is None:
            return self._read_scene(scene)
        if scene not in self.cache:
            self.cache[scene] = self._read_scene(scene)
        return self.cache[scene]

    def split_scenes(self) -> list:
        """The scene numbers this split's items read (`_read_scene`'s argument)."""
        raise NotImplementedError

    def fill_cache(self, bar=None) -> int:
        """Decodes every scene of the split into the cache at once (the training set before its
        first step: without it, the first epoch decodes as it goes, its steps' times vary, and a
        loader process forked later would start empty). A scene that cannot be read is left out,
        for the reader's usual skip and warning. `bar`: a tqdm-like progress bar, updated per
        scene. Returns the number of scenes cached."""
        if self.cache is None:
            raise ValueError("fill_cache needs the dataset's cache on (data.cache)")
        for scene in self.split_scenes():
            if scene not in self.cache:
                try:
                    self.cache[scene] = self._read_scene(scene)
                except CorruptFile:
                    pass
            if bar is not None:
                bar.update(1)
        return len(self.cache)


def _i64(c: int) -> int:
    return c - _M64 if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic), identical on every device."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def sample_pixels(seeds: torch.Tensor, num_candidates: int, num_points: int) -> torch.Tensor:
    """[B, num_points] int64 indices into range(num_candidates), one draw per seed [B]:
    without replacement when num_points <= num_candidates (the num_points smallest hash keys),
    else with replacement."""
    seeds = seeds.to(torch.int64).reshape(-1, 1)
    salt = hash64(seeds)
    if num_points > num_candidates:
        j = torch.arange(num_points, device=seeds.device)
        keys = hash64(salt ^ j)
        return _shr(keys, 1) % num_candidates
    j = torch.arange(num_candidates, device=seeds.device)
    out = []
    # Keys for a few scenes at a time bound the int64 workspace (B x candidates x 8 bytes).
    chunk = max(1, (1 << 24) // max(1, num_candidates))
    for s in salt.split(chunk):
        keys = hash64(s ^ j)
        out.append(torch.topk(keys, num_points, dim=1, largest=False, sorted=False).indices)
    return torch.cat(out)


def random_seed() -> int:
    """A seed for an item that came without one, from numpy's global state (seeded per worker by
    `worker_init_fn`, as the reference's unseeded sampling)."""
    return int(np.random.randint(0, 2 ** 62))


def item_and_seed(item) -> tuple:
    """(index, seed) of a reader's item: `index`, or `(index, seed)` where the seed fixes its
    target-ray draw; an item without one gets `random_seed()`."""
    idx, seed = item if isinstance(item, (tuple, list)) else (item, None)
    return int(idx), random_seed() if seed is None else int(seed)


# ----------------------------------------------------------------------------------------------
# Device-side batch


def _take_views(x: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """x [B, V, ...], views [B, U] -> [B, U, ...]"""
    b = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[b, views]


def _one_hot(ids: torch.Tensor, n: int) -> torch.Tensor:
    return F.one_hot(ids.long(), n).float()


def make_batch(records: dict, spec: BatchSpec) -> dict:
    """Model inputs from collated scene records (tensors on the device that will use them).

    Returns float32 tensors, with B scenes, V_in input views of h x w (after downsampling),
    P target rays and O = spec.num_entities:
        input_images [B, V_in, 3, h, w] in [0, 1], input_camera_pos [B, V_in, 3],
        input_rays [B, V_in, h, w, 3], input_masks [B, V_in, h, w, O] (if the data has masks),
        target_pixels / target_camera_pos / target_rays [B, P, 3], target_masks [B, P, O],
        sceneid [B] (int64).
    """
    images, mats, origins = records["images"], records["ray_mats"], records["origins"]
    in_views, tgt_views = records["input_views"].long(), records["target_views"].long()
    ids = records.get("ids")
    if ids is not None and spec.num_entities < 1:
        raise DataError("records carry instance ids but BatchSpec.num_entities is 0")
    bsz, _, height, width, _ = images.shape
    device = images.device
    out = {}

    # Inputs: whole (downsampled) views.
    # The reference's x[s//2::s, s//2::s]: strided views of the gathered input views, no copy.
    s = downsample_stride(spec.downsample)
    rows = torch.arange(s // 2, height, s, device=device)
    cols = torch.arange(s // 2, width, s, device=device)
    img = _take_views(images, in_views)[:, :, s // 2::s, s // 2::s]         # [B, Vi, h, w, 3]
    out["input_images"] = img.permute(0, 1, 4, 2, 3).float().div_(255)
    out["input_camera_pos"] = _take_views(origins, in_views).float()
    m_in = _take_views(mats, in_views)[:, :, None, None]                     # [B, Vi, 1, 1, 3, 3]
    out["input_rays"] = matrix_rays(m_in, cols[None, :].float(), rows[:, None].float())
    if ids is not None:
        out["input_masks"] = _one_hot(_take_views(ids, in_views)[:, :, s // 2::s, s // 2::s],
                                      spec.num_entities)

    # Targets: sampled pixels of the target views.
    hw = height * width
    num_candidates = tgt_views.shape[1] * hw
    if spec.full_scale:
        idx = torch.arange(num_candidates, device=device).expand(bsz, -1)
    else:
        idx = sample_pixels(records["seed"].to(device), num_candidates, spec.num_points)
    view = torch.gather(tgt_views, 1, idx // hw)                             # [B, P]
    pix = idx % hw
    y, x = pix // width, pix % width
    b = torch.arange(bsz, device=device)[:, None]
    out["target_pixels"] = images[b, view, y, x].float().div_(255)
    out["target_camera_pos"] = origins[b, view].float()
    out["target_rays"] = matrix_rays(mats[b, view], x.float(), y.float())
    if ids is not None:
        out["target_masks"] = _one_hot(ids[b, view, y, x], spec.num_entities)
    out["sceneid"] = records["sceneid"]
    return out


def collate(records: list) -> dict:
    """Collates scene records (numpy) into tensors, keeping dtypes."""
    return torch.utils.data.default_collate(records)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


def model_batch(records, spec: BatchSpec, device="cpu") -> dict:
    """make_batch of a list of records (or one record, or a collated dict) on `device`."""
    if isinstance(records, dict) and not torch.is_tensor(records["images"]):
        records = [records]
    if isinstance(records, (list, tuple)):
        records = collate(list(records))
    return make_batch(to_device(records, device), spec)
