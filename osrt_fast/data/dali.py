"""A DALI loader for 'png' shards: batches of collated scene records, decoded by DALI.

    dataset = ShardDataset(path, "train")
    spec = BatchSpec.for_dataset(dataset, num_points=8192)
    loader = DaliShardLoader(dataset, batch_size=256, device="cuda")
    for records in loader:                        # endless for train=True
        inputs = make_batch(records, spec)

Each batch is the dict of tensors that `records.collate([dataset[(i, s)] for (i, s) in batch])`
gives for the same (index, seed) pairs, with the same dtypes (images uint8 [B, V, H, W, 3], ids
uint8 [B, V, H, W] when the dataset has masks, origins float32 [B, V, 3], ray_mats float32
[B, V, 3, 3], input_views / target_views int64, seed / sceneid int64 [B]), on `device`. Training
batches come from `samplers.ResumableBatchSampler(len(dataset), batch_size, seed, start_it)`, so
the stream is the PyTorch DataLoader's, batch for batch, and resumes exactly at `start_it`;
evaluation batches from `samplers.FixedSampler` (one pass in order; the last may be smaller).

What runs where. The host (the Python thread that iterates) draws the sampler's (index, seed)
pairs, chooses views with the dataset's ViewPolicy, reads cameras from the shard arrays and
slices each view's encoded PNG bytes out of the memory-mapped shard (`.images.bin` / `.ids.bin`
by their offsets): B * V images (and B * V id maps) go to DALI as one batch through
`fn.external_source`. DALI decodes them with `fn.decoders.image` (RGB; GRAY for the ids) on its
own C++ threads (`num_threads`), outside the GIL, `prefetch` batches ahead of the consumer, so
decoding overlaps training. device='cuda' uses DALI's 'mixed' decoder: that decodes JPEG (and
JPEG 2000) on the GPU, but PNG has no GPU decoder; nvImageCodec decodes PNG on the CPU (libpng /
OpenCV) and only writes the result into GPU memory. So for our PNG shards DALI buys threaded,
pipelined CPU decoding whose output lands directly on the GPU (no host collate, no pinned-memory
copy of the images); it does not move decoding onto the GPU. device='cpu' decodes on the same
CPU threads into host memory. The small per-scene arrays (cameras, views, seeds, scene ids) are
built on the host with numpy and copied to the device.

Corrupt data. DALI fails a whole batch when one image in it does not decode. The loader then
decodes that batch on the host with the dataset itself (`dataset[(index, seed)]` for each item:
PIL, exactly the PyTorch path), which skips an undecodable scene for the next one (scene + 1, up
to ShardDataset.MAX_SKIPS), warning and counting each skip through `dataset.skipped` (a
DataWarning). Finding the bad images needs every image of the batch decoded on the host anyway,
so the loader uses that result instead of re-running DALI on a repaired batch. The batch is thus
the one the PyTorch loader gives. Should DALI reject a PNG that PIL decodes, the batch is decoded
on the host with no skip, and a DataWarning says so. (The reverse, a PNG that PIL rejects but
DALI's decoder accepts, would be used as decoded; it does not arise from damage to the pixel
data, which both reject by the chunk checksums: the host verifies every chunk's CRC,
`png.py`.) DALI's dynamic executor, the default since
DALI 2.0, keeps running after a failed batch; with the older executor the loader rebuilds the
pipeline and feeds it again the batches that were in flight.

'raw' shards are memory-mapped arrays with nothing to decode: read them with the PyTorch
DataLoader (`loaders.record_loader`). Install DALI with `pip install 'osrt-fast[dali]'` (the
package nvidia-dali-cuda130, or the build for your CUDA version).
"""
from __future__ import annotations

import math
import sys
import warnings
from collections import deque
from types import SimpleNamespace
from typing import Iterable, Optional

import numpy as np
import torch

from .errors import DataError, DataWarning
from .samplers import FixedSampler, ResumableBatchSampler
from .records import collate, to_device

INSTALL_HINT = ("pip install 'osrt-fast[dali]' (the package nvidia-dali-cuda130, or the DALI "
                "build for your CUDA version)")
FALLBACK_HINT = ("or load the shards with the PyTorch DataLoader instead, which decodes PNG "
                 "with PIL in its worker processes")


def import_dali() -> SimpleNamespace:
    """The DALI modules this loader uses; a DataError with the install command if missing."""
    try:
        import nvidia.dali  # noqa: F401  (first, so a hidden or broken DALI fails here)
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as e:
        raise DataError(f"NVIDIA DALI is not importable ({e}). Install it with {INSTALL_HINT}, "
                        f"{FALLBACK_HINT}.") from None
    return SimpleNamespace(fn=fn, types=types, Pipeline=Pipeline, feed_ndarray=feed_ndarray)


class _Batch:
    """One batch as planned on the host: the items' (index, seed) pairs, their per-scene arrays
    (numpy, stacked) and the encoded PNG bytes of every view, scene-major."""

    __slots__ = ("keys", "arrays", "images", "ids")

    def __init__(self, keys, arrays, images, ids):
        self.keys, self.arrays, self.images, self.ids = keys, arrays, images, ids


class DaliShardLoader:
    """Iterable of collated scene-record batches from a 'png' ShardDataset, decoded by DALI.

    dataset: a ShardDataset of 'png' shards; batch_size: scenes per batch; device: 'cuda' (or
    'cuda:N'; DALI's 'mixed' decoding, outputs in GPU memory) or 'cpu'; num_threads: DALI's
    decoding threads; seed, start_it: the training sampler's seed and first iteration (resume);
    train: endless resumable batches, else one in-order evaluation pass; prefetch: batches DALI
    prepares ahead; batch_sampler: optional iterable of lists of (index, seed) pairs to use
    instead (e.g. a ResumableBatchSampler with rank / world_size).
    See the module docstring for what runs where and how corrupt images are handled.
    """

    def __init__(self, dataset, batch_size: int, device="cuda", num_threads: int = 4,
                 seed: int = 0, start_it: int = 0, train: bool = True, prefetch: int = 2,
                 batch_sampler: Optional[Iterable] = None):
        index = getattr(dataset, "index", None)
        if not isinstance(index, dict) or not hasattr(dataset, "reader"):
            raise DataError(f"DaliShardLoader reads pre-decoded shards (a ShardDataset), not "
                            f"{type(dataset).__name__}; convert the dataset first: python -m "
                            f"osrt_fast.data.shards CONFIG --out DIR --encoding png")
        encoding = index.get("encoding")
        if encoding != "png":
            raise DataError(f"DaliShardLoader decodes 'png' shards; '{dataset.folder}' holds "
                            f"{encoding!r} shards. {encoding!r} shards need no decoding; use the "
                            f"PyTorch DataLoader for them (or convert with --encoding png)")
        if batch_size < 1 or num_threads < 1 or prefetch < 1:
            raise DataError(f"batch_size ({batch_size}), num_threads ({num_threads}) and "
                            f"prefetch ({prefetch}) must be at least 1")
        self.dataset = dataset
        self.batch_size, self.num_threads = int(batch_size), int(num_threads)
        self.prefetch = int(prefetch)
        self.seed, self.start_it, self.train = int(seed), int(start_it), bool(train)
        self.batch_sampler = batch_sampler
        self.has_ids = bool(dataset.reader.has_ids)
        self.views, self.height, self.width = dataset.num_views, dataset.height, dataset.width
        self.device, self.device_id, self.decode_device = self._resolve_device(device)
        self.dali = import_dali()
        self.host_decoded_batches = 0    # batches DALI failed on, decoded on the host instead
        self._exec_dynamic = True        # False: the pre-2.0 executor (rebuilds after errors)

    @staticmethod
    def _resolve_device(device):
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise DataError(f"device {device!r} is not a device ({e}); use 'cuda' or 'cpu'") \
                from None
        if dev.type == "cpu":
            return torch.device("cpu"), None, "cpu"
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise DataError(f"DaliShardLoader was asked for device {str(device)!r}, but "
                                f"PyTorch sees no CUDA device here; use device='cpu' (DALI "
                                f"decodes on CPU threads), or the PyTorch DataLoader")
            i = dev.index if dev.index is not None else torch.cuda.current_device()
            return torch.device("cuda", i), i, "mixed"
        raise DataError(f"DaliShardLoader supports devices 'cuda' and 'cpu', not {str(dev)!r}")

    # ------------------------------------------------------------------------------------------
    # Batches of (index, seed) pairs

    def sampler(self) -> Iterable:
        """The batches of (index, seed) pairs this loader serves, in order."""
        if self.batch_sampler is not None:
            return self.batch_sampler
        n = len(self.dataset)
        if self.train:
            return ResumableBatchSampler(n, self.batch_size, self.seed, start_it=self.start_it)
        return FixedSampler(n, self.batch_size)

    def __len__(self) -> int:
        if self.batch_sampler is not None:
            return len(self.batch_sampler)
        if self.train:
            return sys.maxsize        # endless, as the DataLoader over ResumableBatchSampler
        return math.ceil(len(self.dataset) / self.batch_size)

    # ------------------------------------------------------------------------------------------
    # Host side: what ShardDataset.__getitem__ does, except decoding

    def _plan(self, pairs) -> _Batch:
        ds, reader, nv = self.dataset, self.dataset.reader, self.views
        keys, images, ids = [], [], []
        cols = {k: [] for k in ("origins", "ray_mats", "input_views", "target_views", "seed",
                                "sceneid")}
        for pair in pairs:
            idx, seed, scene, in_views, tgt_views = ds.plan(pair)
            shard, local = reader.locate(scene)
            arrays = reader._shard(shard)
            keys.append((idx, seed))
            cols["origins"].append(arrays["origins"][local])
            cols["ray_mats"].append(arrays["ray_mats"][local])
            cols["input_views"].append(in_views)
            cols["target_views"].append(tgt_views)
            cols["seed"].append(seed)
            cols["sceneid"].append(ds.sceneid(idx, arrays["sceneids"][local]))
            for key, out in (("images", images), ("ids", ids))[:1 + self.has_ids]:
                offsets, blob = arrays[key + ".offsets"], arrays[key]
                first = local * nv
                for v in range(nv):
                    # A view of the memory map; DALI copies it when the batch is fed.
                    out.append(np.asarray(blob[offsets[first + v]:offsets[first + v + 1]]))
        stacked = {
            "origins": np.stack(cols["origins"]).astype(np.float32, copy=False),
            "ray_mats": np.stack(cols["ray_mats"]).astype(np.float32, copy=False),
            "input_views": np.stack(cols["input_views"]).astype(np.int64, copy=False),
            "target_views": np.stack(cols["target_views"]).astype(np.int64, copy=False),
            "seed": np.array(cols["seed"], np.int64),
            "sceneid": np.array(cols["sceneid"], np.int64),
        }
        return _Batch(keys, stacked, images, ids)

    def _host_batch(self, batch: _Batch, error: Exception) -> dict:
        """The batch decoded on the host by the dataset itself (PIL; skips corrupt scenes with a
        counted warning), after DALI failed on it."""
        self.host_decoded_batches += 1
        skipped = self.dataset.skipped.count
        records = collate([self.dataset[key] for key in batch.keys])
        if self.dataset.skipped.count == skipped:
            lines = str(error).strip().splitlines() or [type(error).__name__]
            warnings.warn(f"DALI could not decode a batch that PIL decodes ({lines[0]}); decoded "
                          f"it on the host ({self.host_decoded_batches} batches so far)",
                          DataWarning, stacklevel=3)
        return to_device(records, self.device)

    # ------------------------------------------------------------------------------------------
    # DALI side

    def _pipeline(self, source):
        d = self.dali
        kw = dict(batch_size=self.batch_size * self.views, num_threads=self.num_threads,
                  device_id=self.device_id, prefetch_queue_depth=self.prefetch, seed=self.seed)
        try:
            pipe = d.Pipeline(exec_dynamic=self._exec_dynamic, **kw)
        except TypeError:         # a DALI before the dynamic executor
            self._exec_dynamic = False
            pipe = d.Pipeline(**kw)
        with pipe:
            encoded = d.fn.external_source(source=source, batch=True,
                                           num_outputs=1 + self.has_ids,
                                           dtype=d.types.UINT8, ndim=1)
            outputs = [d.fn.decoders.image(encoded[0], device=self.decode_device,
                                           output_type=d.types.RGB)]
            if self.has_ids:
                outputs.append(d.fn.decoders.image(encoded[1], device=self.decode_device,
                                                   output_type=d.types.GRAY))
            pipe.set_outputs(*outputs)
        pipe.build()
        return pipe

    def _to_torch(self, tensor_list, count: int, channels: int) -> torch.Tensor:
        expect = [self.height, self.width, channels]
        shapes = tensor_list.shape()
        if len(shapes) != count or any(list(s) != expect for s in shapes):
            bad = next((list(s) for s in shapes if list(s) != expect), None)
            raise DataError(f"DALI decoded {len(shapes)} images of {count}, one of shape {bad} "
                            f"where the shard index of '{self.dataset.folder}' says {expect}: "
                            f"the shards are inconsistent; re-convert them")
        dense = tensor_list.as_tensor()
        if self._exec_dynamic:
            # The dynamic executor hands out outputs it no longer reuses: share them.
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    return torch.from_dlpack(dense)
            return torch.from_dlpack(dense)
        out = torch.empty([count] + expect, dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self.dali.feed_ndarray(dense, out, cuda_stream=stream)
        return out

    def _assemble(self, batch: _Batch, outputs) -> dict:
        b, v, h, w = len(batch.keys), self.views, self.height, self.width
        arrays = {k: torch.from_numpy(a).to(self.device) for k, a in batch.arrays.items()}
        records = {"origins": arrays["origins"], "ray_mats": arrays["ray_mats"],
                   "sceneid": arrays["sceneid"],
                   "images": self._to_torch(outputs[0], b * v, 3).view(b, v, h, w, 3)}
        if self.has_ids:
            records["ids"] = self._to_torch(outputs[1], b * v, 1).view(b, v, h, w)
        records.update(input_views=arrays["input_views"], target_views=arrays["target_views"],
                       seed=arrays["seed"])
        return records

    def __iter__(self):
        pairs = iter(self.sampler())
        pending, replay, source_errors = deque(), deque(), []

        def source():
            # Called by DALI (on this thread, inside pipe.run()) for each batch it schedules.
            try:
                batch = replay.popleft() if replay else self._plan(next(pairs))
            except StopIteration:      # the end of an evaluation pass
                raise
            except Exception as e:
                source_errors.append(e)
                raise
            pending.append(batch)
            return (batch.images, batch.ids) if self.has_ids else (batch.images,)

        pipe = self._pipeline(source)
        try:
            while True:
                try:
                    outputs = pipe.run()
                except StopIteration:
                    return
                except Exception as e:
                    if source_errors or not pending:
                        raise
                    # DALI failed on the oldest batch in flight: decode it on the host.
                    yield self._host_batch(pending.popleft(), e)
                    if not self._exec_dynamic:
                        # The old executor's pipeline is unusable now: rebuild it and feed it
                        # again the batches that were in flight.
                        replay.extend(pending)
                        pending.clear()
                        pipe = None
                        pipe = self._pipeline(source)
                    continue
                yield self._assemble(pending.popleft(), outputs)
        finally:
            del pipe
