"""Reads every scene of a dataset and lists every problem found, with its file and reason.

Training replaces a damaged scene by the next readable one (with a counted DataWarning), so a
damaged dataset still trains; this command finds every damaged file up front:

    python -m osrt_fast.data.check CONFIG [--split train|val|test|all] [--max-scenes N]

CONFIG is a training config: its data section names the dataset, as for training. Each split
(default: all three) is opened as training opens it (`get_dataset`), then every scene of it is
read as training reads it (all views and masks; PNG signatures and chunk CRCs verified; sizes,
channels and mask ids checked against the split), with a progress bar on a terminal.
`--max-scenes N` reads only the first N scenes of each split.

Each problem is printed as `split: file: reason`. Exit code: 0 when everything reads, 1 when
problems were found (a split that cannot be opened at all counts as one), 2 for a bad config
or arguments. The built-in procedural data is not generated here; a folder without it is
reported. MSN-Hard (Kubric) records are read as a stream: the records its loader skips are
reported, and an unreadable record file ends that split's check.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Iterable, Optional

from .errors import CorruptFile, DataError, DataWarning
from ..errors import command

SPLITS = ("train", "val", "test")


def _scene_reader(dataset):
    """(number of scenes, read(k)) of a dataset: read(k) reads scene k as training does, raising
    CorruptFile for a damaged one; for streams (which have no `check_scene`) it reads the next
    record, so the scenes must be read in order."""
    if hasattr(dataset, "check_scene"):
        return dataset.num_scenes, dataset.check_scene
    from .shards import scene_records               # streams: read in file order
    records = scene_records(dataset)
    return dataset.num_scenes, lambda k: next(records)


def _read_scene(read, k: int, total: int) -> tuple:
    """(problems, stop) of reading scene k: the DataWarnings raised meanwhile (records a stream
    skipped), then its CorruptFile, if any; stop: whether reading cannot go on."""
    error, stop = [], False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        try:
            read(k)
        except CorruptFile as e:
            error = [str(e)]
        except DataError as e:
            error, stop = [f"reading stopped at scene {k}: {e}"], True
        except StopIteration:
            error, stop = [f"the records ended after {k} of {total} scenes"], True
    skipped = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    return skipped + error, stop


def check_split(dataset, split: str, max_scenes: Optional[int] = None,
                progress: bool = True) -> list:
    """Problems (strings 'file: reason') found reading every scene of `dataset` (the first
    `max_scenes`), printing each as it is found."""
    from ..progress import progress_bar
    total, read = _scene_reader(dataset)
    if max_scenes is not None:
        total = min(total, max_scenes)
    problems = []
    bar = progress_bar(range(total), enabled=progress, unit="scene", desc=f"checking {split}")
    for k in bar:
        found, stop = _read_scene(read, k, total)
        for problem in found:
            bar.write(f"{split}: {problem}", file=sys.stdout)
        problems += found
        if stop:
            break
    bar.close()
    return problems


def _open_split(split: str, data_cfg):
    """The split's dataset, as training opens it, but never generating the built-in data."""
    from . import batch_spec, get_dataset
    path = data_cfg.resolved_path()
    if data_cfg.dataset == "procedural" and not os.path.isfile(os.path.join(path, "metadata.npz")):
        raise DataError(f"'{path}' holds no generated procedural data (no metadata.npz); the "
                        f"first training run generates it, or `python -m osrt_fast.scenes "
                        f"--out {path}` with the config's settings")
    dataset = get_dataset(split, data_cfg)
    batch_spec(data_cfg, dataset)           # views the encoder cannot take are a problem too
    return dataset


@command
def main(argv: Optional[Iterable[str]] = None) -> int:
    from ..config import load_config
    p = argparse.ArgumentParser(prog="python -m osrt_fast.data.check",
                                description="Read every scene of a dataset and report every "
                                            "problem (file, reason). Exit code 0: clean, 1: "
                                            "problems found, 2: bad config.")
    p.add_argument("config", help="a training config (its data section names the dataset)")
    p.add_argument("--split", default="all", choices=SPLITS + ("all",))
    p.add_argument("--max-scenes", type=int, help="read only the first N scenes of each split")
    a = p.parse_args(None if argv is None else list(argv))
    if a.max_scenes is not None and a.max_scenes < 1:
        p.error(f"--max-scenes must be at least 1, got {a.max_scenes}")
    splits = SPLITS if a.split == "all" else (a.split,)
    problems, unopened, scenes_read = 0, 0, 0
    cfg = load_config(a.config)
    path = cfg.data.resolved_path()
    if not os.path.exists(path):
        make = (f"the first training run generates it (python train.py {a.config}), or "
                f"`python -m osrt_fast.scenes --out {path}` with the config's settings"
                if cfg.data.dataset == "procedural" else
                "download or convert the dataset there (docs/datasets.md)")
        print(f"error: the data folder '{path}' does not exist: {make}; or set data.path "
              f"in {a.config} to where the data is", file=sys.stderr)
        return 1
    for split in splits:
        try:
            ds = _open_split(split, cfg.data)
        except DataError as e:
            unopened += 1
            print(f"{split}: cannot open the split: {e}")
            continue
        print(f"checking {split}: {ds.num_scenes} scenes of {cfg.data.dataset} at "
              f"'{path}'", flush=True)
        problems += len(check_split(ds, split, a.max_scenes))
        scenes_read += min(ds.num_scenes, a.max_scenes or ds.num_scenes)
    if unopened:
        print(f"{unopened} split(s) of {', '.join(splits)} could not be opened; see above.")
    if problems:
        print(f"{problems} problem(s) found in {', '.join(splits)}; see above. Damaged "
              f"scenes are skipped in training (with a warning); replace the files to use them.")
    if unopened or problems:
        return 1
    print(f"all {scenes_read} scenes of {', '.join(splits)} read without problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
