"""Pre-decoded shards: convert any dataset once, then train without decoding anything.

Layout of a converted split (`<out>/<split>/`):

    index.json                 format, encoding, shapes, view policy, render range, source,
                               shard list; written last, so it marks a complete conversion
    shard_00000.json           {"count": n}; written after the shard's arrays (resume marker)
    shard_00000.images.npy     uint8   [n, V, H, W, 3]     (encoding 'raw')
    shard_00000.ids.npy        uint8   [n, V, H, W]        (raw; datasets with masks)
    shard_00000.origins.npy    float32 [n, V, 3]
    shard_00000.ray_mats.npy   float32 [n, V, 3, 3]
    shard_00000.sceneids.npy   int64   [n]
    (encoding 'png': shard_00000.images.bin / .ids.bin, PNG files back to back, and
     shard_00000.images.offsets.npy / .ids.offsets.npy, int64 [n * V + 1] byte offsets)

'raw' shards are read by memory mapping: an item is a slice copy, so a loader worker serves
thousands of scenes per second. They are large (MSN-Hard: 0.65 MB per scene, 650 GB for the
million training scenes); 'png' shards keep the images compressed (~4x smaller) and are decoded
by the loader, on the CPU, or by DALI (`dali.py`).

The converter is resumable: it skips the shards already written and continues from the first
missing scene. CLI:

    python -m osrt_fast.data.shards CONFIG --out DIR [--splits train val test]
        [--encoding raw|png] [--shard-size 1000] [--max-scenes N]
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import time
from typing import Iterable, Iterator, Optional

import numpy as np
from torch.utils.data import Dataset

from .errors import CorruptFile, DataError, SkipCounter
from ..errors import command
from .png import decode_png
from .records import ViewPolicy, item_and_seed

FORMAT = "osrt-fast-shards"
FORMAT_VERSION = 1
ENCODINGS = ("raw", "png")
ARRAYS = ("origins", "ray_mats", "sceneids")


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}"


def _save_npy(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _encode_png(array: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_shard(folder: str, index: int, records: list, encoding: str) -> None:
    name = os.path.join(folder, _shard_name(index))
    has_ids = "ids" in records[0]
    images = np.stack([r["images"] for r in records])
    if encoding == "raw":
        _save_npy(name + ".images.npy", images)
        if has_ids:
            _save_npy(name + ".ids.npy", np.stack([r["ids"] for r in records]))
    else:
        planes = {"images": images}
        if has_ids:
            planes["ids"] = np.stack([r["ids"] for r in records])
        for key, arr in planes.items():
            blobs = [_encode_png(view) for scene in arr for view in scene]
            offsets = np.zeros(len(blobs) + 1, np.int64)
            offsets[1:] = np.cumsum([len(b) for b in blobs])
            tmp = name + f".{key}.bin.tmp"
            with open(tmp, "wb") as f:
                for b in blobs:
                    f.write(b)
            os.replace(tmp, name + f".{key}.bin")
            _save_npy(name + f".{key}.offsets.npy", offsets)
    _save_npy(name + ".origins.npy", np.stack([r["origins"] for r in records]).astype(np.float32))
    _save_npy(name + ".ray_mats.npy",
              np.stack([r["ray_mats"] for r in records]).astype(np.float32))
    _save_npy(name + ".sceneids.npy", np.array([int(r["sceneid"]) for r in records], np.int64))
    with open(name + ".json.tmp", "w") as f:
        json.dump({"count": len(records)}, f)
    os.replace(name + ".json.tmp", name + ".json")


def _shard_count(marker: str) -> Optional[int]:
    """The scene count in a shard's marker file; None if it is missing or damaged (then the
    shard counts as not written)."""
    try:
        with open(marker) as f:
            return int(json.load(f)["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _done_shards(folder: str) -> list:
    """Counts of the complete shards 0, 1, ... (stops at the first missing or damaged one)."""
    counts = []
    while True:
        n = _shard_count(os.path.join(folder, _shard_name(len(counts)) + ".json"))
        if n is None:
            return counts
        counts.append(n)


def scene_records(dataset, start: int = 0) -> Iterator[dict]:
    """Every scene of a dataset once, in order, from scene `start` (all views, no sampling)."""
    if hasattr(dataset, "ordered_records"):            # streams (Kubric)
        yield from dataset.ordered_records(start)
        return
    for k in range(start, dataset.num_scenes):
        yield dataset[(k, 0)]     # cyclic datasets: item k < num_scenes is scene k, view 0


def convert(dataset, out: str, encoding: str = "raw", shard_size: int = 1000,
            max_scenes: Optional[int] = None, progress: bool = True, source: str = "") -> str:
    """Writes `dataset`'s scenes to pre-decoded shards in `out` (one split); resumable.

    dataset: a loader of this package (its view policy, masks and render range are recorded,
    so the shards load with the same semantics). Returns `out`.
    """
    if encoding not in ENCODINGS:
        raise DataError(f"unknown shard encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
    os.makedirs(out, exist_ok=True)
    total = dataset.num_scenes if max_scenes is None else min(max_scenes, dataset.num_scenes)
    settings = {"encoding": encoding, "shard_size": int(shard_size), "num_scenes": int(total),
                "source": source}
    settings_path = os.path.join(out, "convert.json")
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            old = json.load(f)
        if old != settings:
            raise DataError(f"'{out}' holds a conversion with other settings ({old}); asked for "
                            f"{settings}. Use another --out folder or delete this one.")
    else:
        with open(settings_path, "w") as f:
            json.dump(settings, f)
    done = _done_shards(out)
    start = min(sum(done), total)
    bar = None
    if progress:
        from ..progress import progress_bar
        bar = progress_bar(total=total, initial=start, unit="scene", desc=f"converting to {out}")
        if start:
            bar.write(f"resuming: {len(done)} shards ({start} scenes) already written")
    buffer, first = [], None
    t0 = time.perf_counter()
    if start < total:
        for rec in scene_records(dataset, start):
            if first is None:
                first = rec
            buffer.append(rec)
            if len(buffer) == shard_size or start + len(buffer) == total:
                _write_shard(out, len(done), buffer, encoding)
                done.append(len(buffer))
                start += len(buffer)
                if bar is not None:
                    bar.update(len(buffer))
                    bar.set_postfix(scenes_per_s=f"{len(buffer) / (time.perf_counter() - t0):.0f}")
                    t0 = time.perf_counter()
                buffer = []
                if start >= total:
                    break
    if bar is not None:
        bar.close()
    if sum(done) < total:
        raise DataError(f"the source ended after {sum(done)} of {total} scenes; '{out}' is "
                        f"incomplete (re-run to retry)")
    if first is None:
        first = _read_first(out, done, encoding)
    v, h, w = first["images"].shape[:3]
    policy = dataset.policy
    index = {
        "format": FORMAT, "version": FORMAT_VERSION, "encoding": encoding,
        "num_scenes": int(total), "num_views": int(v), "height": int(h), "width": int(w),
        "num_entities": int(dataset.num_entities) if "ids" in first else 0,
        "views": policy.to_dict(),
        "sceneid": "item" if policy.inputs == "cyclic" else "stored",
        "render_kwargs": dict(getattr(dataset, "render_kwargs", {})),
        "shard_size": int(shard_size), "shards": [int(c) for c in done], "source": source,
    }
    tmp = os.path.join(out, "index.json.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(out, "index.json"))
    return out


def _read_first(out, done, encoding) -> dict:
    reader = _ShardReader(out, encoding, done, has_ids=os.path.exists(
        os.path.join(out, _shard_name(0) + (".ids.npy" if encoding == "raw" else ".ids.bin"))))
    try:
        return reader.read(0)
    except CorruptFile as e:
        raise DataError(f"the first scene of '{out}' cannot be read ({e}); delete "
                        f"{os.path.join(out, _shard_name(0))}.json and re-run the "
                        f"converter") from None


class _ShardReader:
    """Reads scenes from one split's shards; opens memory maps lazily, per process."""

    def __init__(self, folder: str, encoding: str, counts: list, has_ids: bool):
        self.folder, self.encoding, self.has_ids = folder, encoding, has_ids
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._open = {}

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}

    def _load(self, i: int) -> dict:
        """Shard i's arrays (memory maps), checked against its scene count; CorruptFile if a
        file is missing, truncated or of the wrong length."""
        base = os.path.join(self.folder, _shard_name(i))
        try:
            arrays = {k: np.load(f"{base}.{k}.npy", mmap_mode="r") for k in ARRAYS}
            if self.encoding == "raw":
                for k in ("images", "ids") if self.has_ids else ("images",):
                    arrays[k] = np.load(f"{base}.{k}.npy", mmap_mode="r")
            else:
                for k in ("images", "ids") if self.has_ids else ("images",):
                    arrays[k] = np.memmap(f"{base}.{k}.bin", np.uint8, "r")
                    arrays[k + ".offsets"] = np.load(f"{base}.{k}.offsets.npy")
        except (OSError, ValueError) as e:
            raise CorruptFile(f"shard '{base}' is unreadable ({e})") from None
        count = int(self.starts[i + 1] - self.starts[i])
        if arrays["origins"].ndim != 3:
            raise CorruptFile(f"'{base}.origins.npy' has shape {arrays['origins'].shape}, not "
                              f"[scenes, views, 3]")
        views = arrays["origins"].shape[1]
        for k, a in arrays.items():
            if self.encoding == "png" and k in ("images", "ids"):
                continue        # PNG bytes: checked against the offsets when read
            want = count * views + 1 if k.endswith(".offsets") else count
            if len(a) != want:
                raise CorruptFile(f"shard '{base}': {k} has {len(a)} entries, but the index's "
                                  f"{count} scenes of {views} views need {want}")
        return arrays

    def arrays(self, i: int) -> dict:
        """Shard i's arrays, opened once per process; CorruptFile if it is unreadable."""
        if i not in self._open:
            self._open[i] = self._load(i)
        return self._open[i]

    def _shard(self, i: int) -> dict:
        """`arrays`, with a DataError for an unreadable shard (for the DALI loader)."""
        try:
            return self.arrays(i)
        except CorruptFile as e:
            raise DataError(f"{e}; re-run the converter on '{self.folder}' after deleting "
                            f"{os.path.join(self.folder, _shard_name(i))}.json") from None

    def opens(self, i: int) -> bool:
        """Whether shard i's files open (`arrays` raises no CorruptFile)."""
        try:
            self.arrays(i)
            return True
        except CorruptFile:
            return False

    def locate(self, scene: int):
        i = int(np.searchsorted(self.starts, scene, side="right") - 1)
        return i, scene - int(self.starts[i])

    def _planes(self, i, arrays, key, local, views):
        offsets, blob = arrays[key + ".offsets"], arrays[key]
        name = f"'{os.path.join(self.folder, _shard_name(i))}.{key}.bin' scene {local}"
        out = []
        for v in range(views):
            a, b = int(offsets[local * views + v]), int(offsets[local * views + v + 1])
            if not 0 <= a <= b <= len(blob):
                raise CorruptFile(f"{name} view {v}: bytes {a}-{b} lie outside the "
                                  f"{len(blob)}-byte file")
            out.append(decode_png(bytes(blob[a:b]), f"{name} view {v}"))
        return np.stack(out)

    def read(self, scene: int) -> dict:
        """Scene `scene`'s record (images, ids, origins, ray_mats, sceneid); CorruptFile if its
        shard or PNG data is damaged."""
        i, local = self.locate(scene)
        arrays = self.arrays(i)
        rec = {k: np.array(arrays[k][local]) for k in ("origins", "ray_mats")}
        rec["sceneid"] = int(arrays["sceneids"][local])
        views = rec["origins"].shape[0]
        if self.encoding == "raw":
            rec["images"] = np.array(arrays["images"][local])
            if self.has_ids:
                rec["ids"] = np.array(arrays["ids"][local])
        else:
            rec["images"] = self._planes(i, arrays, "images", local, views)
            if self.has_ids:
                rec["ids"] = self._planes(i, arrays, "ids", local, views)
        return rec


def read_index(path: str, mode: str) -> tuple:
    """(split folder, index dict) of converted shards at `path` (the converter's --out)."""
    if not os.path.isdir(path):
        raise DataError(f"shards folder '{path}' does not exist. Convert a dataset first: "
                        f"python -m osrt_fast.data.shards CONFIG --out {path}")
    folder = os.path.join(path, mode)
    index_path = os.path.join(folder, "index.json")
    if not os.path.isfile(index_path):
        have = sorted(os.path.basename(os.path.dirname(p))
                      for p in glob.glob(os.path.join(path, "*", "index.json")))
        partial = os.path.isdir(folder) and glob.glob(os.path.join(folder, "shard_*.json"))
        hint = (f"'{folder}' holds a partial conversion: re-run the converter, it resumes."
                if partial else f"Converted splits here: {have or 'none'}; convert this one "
                f"with python -m osrt_fast.data.shards CONFIG --out {path} --splits {mode}.")
        raise DataError(f"'{index_path}' is missing. {hint}")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"'{index_path}' is damaged ({type(e).__name__}: {e}); delete it and "
                        f"re-run the converter on '{folder}': it keeps the written shards and "
                        f"writes the index again.") from None
    if not isinstance(index, dict):
        index = {}
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise DataError(f"'{index_path}' is not an {FORMAT} v{FORMAT_VERSION} index "
                        f"(format {index.get('format')!r}, version {index.get('version')!r}); "
                        f"re-convert with this version of osrt-fast")
    return folder, index


class ShardDataset(Dataset):
    """Scene records from pre-decoded shards, with the source dataset's view policy.

    Args: path (the converter's --out), mode ('train' / 'val' / 'test'), max_len (as the
    other loaders), num_input_views (default: the source's). Random view choices and ray
    samples follow the (index, seed) the sampler gives.

    A scene whose shard files are unreadable or of the wrong length, whose PNG data is damaged
    (`png.decode_png` checks every chunk's CRC), or whose arrays do not fit the index (shape,
    ids beyond num_entities - 1) is replaced by the next readable scene, passing over the rest of
    an unreadable shard, with a counted DataWarning naming the file and the reason;
    MAX_SKIPS + 1 failures in a row raise DataError. (Raw pixels have no checksum: a flipped
    bit in a raw shard goes unnoticed.) `check_scene` reads one scene without substitution.
    """

    MAX_SKIPS = 16

    def __init__(self, path: str, mode: str, max_len: Optional[int] = None,
                 num_input_views: Optional[int] = None):
        self.folder, self.index = read_index(path, mode)
        ix = self.index
        self.num_scenes, self.num_views = int(ix["num_scenes"]), int(ix["num_views"])
        self.height, self.width = int(ix["height"]), int(ix["width"])
        self.num_entities = int(ix["num_entities"])
        views = dict(ix["views"])
        if num_input_views is not None:
            views["num_input_views"] = int(num_input_views)
        self.policy = ViewPolicy(**views)
        self.policy.choose(0, 1, self.num_views, np.random.default_rng(0))   # validates
        self.render_kwargs = ix.get("render_kwargs", {})
        self.max_len = max_len
        counts = _done_shards(self.folder)
        if sum(counts[:len(ix["shards"])]) != self.num_scenes:
            raise DataError(f"'{self.folder}' lists {len(ix['shards'])} shards of "
                            f"{self.num_scenes} scenes in index.json, but only {len(counts)} "
                            f"complete shard files are there: the folder is damaged or was "
                            f"copied in part. Copy it again, or re-run the converter.")
        self.reader = _ShardReader(self.folder, ix["encoding"], ix["shards"],
                                   has_ids=self.num_entities > 0)
        self.skipped = SkipCounter("shard scene")

    def __len__(self) -> int:
        if self.max_len is not None:
            return self.max_len
        return self.num_scenes * self.policy.items_per_scene(self.num_views)

    def plan(self, item) -> tuple:
        """(index, seed, scene, input views, target views) of an item `index` or
        `(index, seed)`: everything about it but its pixels (shared with the DALI loader)."""
        idx, seed = item_and_seed(item)
        scene, in_views, tgt_views = self.policy.choose(idx, self.num_scenes, self.num_views,
                                                        np.random.default_rng(seed))
        return idx, seed, scene, in_views, tgt_views

    def sceneid(self, idx: int, stored: int) -> int:
        """The item's sceneid: its index for the cyclic datasets (as their loaders), else the
        source's scene id stored in the shard."""
        return idx if self.index["sceneid"] == "item" else int(stored)

    def _read(self, scene: int) -> dict:
        """The record of `scene`, checked against the index; CorruptFile otherwise."""
        rec = self.reader.read(scene)
        v, h, w = self.num_views, self.height, self.width
        want = {"images": (v, h, w, 3), "ids": (v, h, w), "origins": (v, 3), "ray_mats": (v, 3, 3)}
        for k, shape in want.items():
            if k in rec and rec[k].shape != shape:
                raise CorruptFile(f"scene {scene} of '{self.folder}': {k} has shape "
                                  f"{rec[k].shape}, but index.json says {shape}")
        if "ids" in rec and rec["ids"].max() >= self.num_entities:
            raise CorruptFile(f"scene {scene} of '{self.folder}': instance id {rec['ids'].max()} "
                              f"is beyond the {self.num_entities} slots in index.json")
        return rec

    def check_scene(self, k: int) -> None:
        """Reads scene k as training does; CorruptFile names the first problem."""
        self._read(k)

    def _candidates(self, scene: int) -> Iterator[int]:
        """`scene`, then the following scenes cyclically; after a scene of a shard that does not
        open, the rest of that shard is passed over (a function of the files only, so the
        substitute is deterministic)."""
        while True:
            yield scene
            i, _ = self.reader.locate(scene)
            scene = (scene + 1) if self.reader.opens(i) else int(self.reader.starts[i + 1])
            scene %= self.num_scenes

    def __getitem__(self, item):
        idx, seed, scene, in_views, tgt_views = self.plan(item)
        _, rec = self.skipped.first_readable(
            self._read, self._candidates(scene), self.MAX_SKIPS + 1,
            f"{self.MAX_SKIPS + 1} scenes in a row from scene {scene} of '{self.folder}' could "
            f"not be read: re-convert the dataset")
        rec.update(input_views=in_views, target_views=tgt_views, seed=seed,
                   sceneid=self.sceneid(idx, rec["sceneid"]))
        return rec


# ----------------------------------------------------------------------------------------------


@command
def main(argv: Optional[Iterable[str]] = None) -> int:
    from osrt_fast.config import load_config

    from . import get_dataset

    p = argparse.ArgumentParser(
        prog="python -m osrt_fast.data.shards",
        description="Convert a dataset to pre-decoded shards (resumable). Then train with "
                    "`data: {dataset: shards, path: OUT}` (num_points and kwargs as before).")
    p.add_argument("config", help="a training config naming the source dataset (data section)")
    p.add_argument("--out", required=True, help="output folder; each split goes to OUT/<split>")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"],
                   choices=["train", "val", "test"])
    p.add_argument("--encoding", default="raw", choices=ENCODINGS,
                   help="raw: memory-mapped uint8 (fastest, large); png: compressed, decoded "
                        "by the loader or DALI")
    p.add_argument("--shard-size", type=int, default=1000, help="scenes per shard")
    p.add_argument("--max-scenes", type=int, help="convert at most this many scenes per split")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    for split in a.splits:
        ds = get_dataset(split, cfg.data)
        out = convert(ds, os.path.join(a.out, split), a.encoding, a.shard_size,
                      a.max_scenes, source=f"{cfg.data.dataset}:{cfg.data.resolved_path()}")
        print(f"{split}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
