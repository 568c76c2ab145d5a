"""Scene-loading throughput of each data path at MSN-Hard shapes, as training sees it.

    python -m benchmarks.speed.bench_loader [--paths tfds png_folder shards_raw shards_png dali]
        [--workers 1 4 16] [--batch-size 32] [--batches 20] [--warmup N] [--scenes 256]
        [--data-dir .scratch/bench_loader] [--out benchmarks/results/loader.jsonl]
        [--device cpu|cuda] [--quick] [--height 128 --width 128 --points 8192] [--sizes-only]

Shapes (MSN-Hard): scenes of 10 views of 128x128 with instance ids (34 one-hot mask channels),
5 input views, 8192 target rays per scene. The data is generated once, with the built-in scene
renderer, under --data-dir/<H>x<W>_<N>scenes/ and reused by later runs:

    tfds        KubricDataset over an MSN-Hard-format TFDS folder (kubric.write_fixture): TF
                reads the tfrecords and decodes PNGs in each DataLoader worker ('spawn' workers)
    png_folder  ObSuRFDataset over a procedural ObSuRF-layout folder of the same size (10 views,
                5 input views): one PNG file per image and per mask, decoded by PIL
    shards_raw  ShardDataset, raw shards converted from the tfds fixture: memory-mapped uint8,
                nothing to decode
    shards_png  ShardDataset, png shards (converted from the raw ones): PNGs decoded by PIL
    dali        osrt_fast.data.dali.DaliShardLoader over the png shards (num_threads = workers,
                at least 1; no worker processes), when that module imports and runs on
                --device; otherwise a row that says why not

Where shards are made, a first row (`"bench": "shard_sizes"`) records the raw and png shards'
bytes on disk for the same scenes; --sizes-only records only that row.

Each (path, workers) uses train.py's DataLoader settings (`data.record_loader`: the
resumable (index, seed) batch sampler for map-style datasets, `loader_kwargs(dataset)` for the
'spawn' context of TFDS, `data.loader_options`: worker_init, persistent workers, pin_memory on
CUDA). Timed:

    startup_s       wall time from creating the iterator to the first batch (worker start-up,
                    TF import, the TFDS shuffle buffer filling, ...)
    warm-up         --warmup further batches, not timed (default workers + 1: the batches the
                    workers prefetched during start-up, so the window sees production only)
    scenes_per_s    batch_size * batches / wall time of the next --batches batches
    median_batch_s  median time between consecutive batches in that window (with many workers
                    batches arrive in bursts, so this can be far below the mean; scenes_per_s is
                    the throughput figure)

`make_batch(records, spec)` (view gather, rays, target-ray sampling, one-hot masks) runs on the
training device, after the loader; it is timed apart, on one collated batch moved to --device
(default cuda when available), with one spec for every path: 8192 points, 34 mask channels.
make_batch_scenes_per_s = batch_size / median make_batch time (CUDA-synchronised). png_folder's
targets come from all 10 views (ObSuRF policy) instead of the 5 non-input views, so its ray
sampling draws from twice as many candidates.

One JSON line per (path, workers) is appended to --out; a readable table is printed. --quick:
few scenes and batches at the same shapes (--height/--width/--points shrink them further, for
the smoke test).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from types import SimpleNamespace

import torch

from benchmarks.common import RESULTS_DIR, ROOT, environment
from osrt_fast.data import make_batch, to_device
from osrt_fast.data.records import BatchSpec

PATHS = ("tfds", "png_folder", "shards_raw", "shards_png", "dali")
NUM_VIEWS, NUM_INPUT_VIEWS, NUM_ENTITIES = 10, 5, 34
SEED = 0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "cpu"


def tf_available() -> bool:
    try:
        import tensorflow  # noqa: F401
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Data: generated once per (shape, scene count), reused afterwards


def prepare_data(args, paths) -> SimpleNamespace:
    """Folders of the datasets the chosen paths need (generated when missing)."""
    root = os.path.join(args.data_dir, f"{args.height}x{args.width}_{args.scenes}scenes")
    os.makedirs(root, exist_ok=True)
    d = SimpleNamespace(root=root, tfds=None, obsurf=None, shards_raw=None, shards_png=None,
                        shards_source=None)
    have_tf = tf_available()
    need_shards = any(p in paths for p in ("shards_raw", "shards_png", "dali"))
    if have_tf and ("tfds" in paths or need_shards):
        d.tfds = _prepare_tfds(os.path.join(root, "tfds"), args)
    # Without TensorFlow the tfds rows say why, and the shards come from the PNG folder.
    if "png_folder" in paths or (need_shards and d.tfds is None):
        d.obsurf = _prepare_obsurf(os.path.join(root, "obsurf"), args)
    if need_shards:
        # From the TFDS fixture (MSN-Hard's view policy); without TensorFlow, from the folder.
        d.shards_source = "tfds" if d.tfds else "png_folder"
        sub = "from_tfds" if d.tfds else "from_obsurf"
        d.shards_raw = os.path.join(root, "shards_raw_" + sub)
        d.shards_png = os.path.join(root, "shards_png_" + sub)
        _prepare_shards(d, args)
    return d


def _prepare_tfds(out: str, args) -> str:
    from osrt_fast.data.kubric import VERSION, write_fixture
    target = os.path.join(out, "multi_shapenet_frames", VERSION)
    if not os.path.isfile(os.path.join(target, "dataset_info.json")):
        print(f"writing the MSN-Hard-format TFDS fixture ({args.scenes} scenes of "
              f"{NUM_VIEWS}x{args.height}x{args.width}) to {out}; this runs once", flush=True)
        t0 = time.perf_counter()
        write_fixture(out, {"train": args.scenes}, args.height, args.width,
                      shards=min(8, args.scenes))
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return target


def _prepare_obsurf(out: str, args) -> str:
    from osrt_fast import scenes
    if not os.path.isfile(os.path.join(out, "metadata.npz")):
        print(f"generating the ObSuRF-layout folder ({args.scenes} scenes of "
              f"{NUM_VIEWS}x{args.height}x{args.width}) in {out}; this runs once", flush=True)
        t0 = time.perf_counter()
        scenes.generate_dataset(out, args.scenes, height=args.height, width=args.width,
                                num_views=NUM_VIEWS, seed=SEED, progress=not args.quiet,
                                device=getattr(args, "generate_device", "cpu"))
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _prepare_shards(d, args) -> None:
    from osrt_fast.data.shards import ShardDataset, convert
    shard_size = max(1, min(64, args.scenes // 4))
    if not os.path.isfile(os.path.join(d.shards_raw, "train", "index.json")):
        print(f"converting {d.shards_source} to raw shards in {d.shards_raw}", flush=True)
        if d.tfds:
            from osrt_fast.data.kubric import KubricDataset
            src = KubricDataset(d.tfds, "train", num_input_views=NUM_INPUT_VIEWS, seed=SEED)
        else:
            src = _obsurf_dataset(d.obsurf, args)
        convert(src, os.path.join(d.shards_raw, "train"), "raw", shard_size,
                progress=not args.quiet, source=f"{d.shards_source}:bench_loader")
    if not os.path.isfile(os.path.join(d.shards_png, "train", "index.json")):
        print(f"converting the raw shards to png shards in {d.shards_png}", flush=True)
        src = ShardDataset(d.shards_raw, "train")
        convert(src, os.path.join(d.shards_png, "train"), "png", shard_size,
                progress=not args.quiet, source=f"{d.shards_source}:bench_loader")


def _obsurf_dataset(folder: str, args):
    from osrt_fast.data.obsurf import ObSuRFDataset
    # Every scene of the folder in the split (not the procedural 90 %), all 10 views.
    return ObSuRFDataset(folder, "train", kind="procedural", num_input_views=NUM_INPUT_VIEWS,
                         split_ranges={"train": (0, args.scenes)})


def make_dataset(path: str, data, args):
    """(dataset, source description) of a loader path; raises RuntimeError('skipped: ...')."""
    if path == "tfds":
        if data.tfds is None:
            raise RuntimeError("skipped: tensorflow / tensorflow-datasets not importable")
        from osrt_fast.data.kubric import KubricDataset
        return KubricDataset(data.tfds, "train", num_input_views=NUM_INPUT_VIEWS, seed=SEED), "tfds"
    if path == "png_folder":
        return _obsurf_dataset(data.obsurf, args), "png_folder"
    from osrt_fast.data.shards import ShardDataset
    folder = data.shards_raw if path == "shards_raw" else data.shards_png
    return ShardDataset(folder, "train"), data.shards_source


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def shard_sizes(data, args, env) -> dict:
    """The raw and png shards' bytes on disk for the same scenes (no timing)."""
    return {"bench": "shard_sizes", "source": data.shards_source, "scenes": args.scenes,
            "height": args.height, "width": args.width, "views": NUM_VIEWS,
            "raw_bytes": folder_bytes(data.shards_raw), "png_bytes": folder_bytes(data.shards_png),
            **env}


# ----------------------------------------------------------------------------------------------
# Loaders


def torch_loader(dataset, batch_size: int, workers: int, device: torch.device):
    """train.py's training DataLoader for `dataset` (data.record_loader, data.loader_options)."""
    from osrt_fast.data import loader_options, record_loader
    return record_loader(dataset, batch_size, loader_options(workers, device), train=True, seed=SEED)


def dali_loader(data, args, batch_size: int, workers: int, device: torch.device):
    """DaliShardLoader over the png shards; raises RuntimeError('skipped: ...') if unusable."""
    try:
        from osrt_fast.data.dali import DaliShardLoader
    except Exception as e:      # ImportError, or DALI's own errors at import
        raise RuntimeError(f"skipped: osrt_fast.data.dali not importable "
                           f"({type(e).__name__}: {e})") from None
    from osrt_fast.data.shards import ShardDataset
    dataset = ShardDataset(data.shards_png, "train")
    try:
        return DaliShardLoader(dataset, batch_size=batch_size, device=device.type,
                               num_threads=max(1, workers), seed=SEED), data.shards_source
    except Exception as e:
        raise RuntimeError(f"skipped: DaliShardLoader failed to start on {device.type} "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                           ) from None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(loader, batches: int, warmup: int, device: torch.device) -> dict:
    """Start-up (first batch), then `warmup` untimed batches, then `batches` timed ones."""
    t0 = time.perf_counter()
    it = iter(loader)
    try:
        batch = next(it)
        sync(device)
        startup = time.perf_counter() - t0
        for _ in range(warmup):
            batch = next(it)
        sync(device)
        gaps = []
        start = prev = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
            sync(device)
            now = time.perf_counter()
            gaps.append(now - prev)
            prev = now
        window = prev - start
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del it
    return {"startup_s": startup, "window_s": window, "median_batch_s": statistics.median(gaps),
            "mean_batch_s": window / batches, "last_batch": batch}


def time_make_batch(records: dict, spec: BatchSpec, device: torch.device, repeat: int) -> dict:
    """Median seconds of make_batch on a batch already on `device` (and of the copy there)."""
    records = {k: v for k, v in records.items() if torch.is_tensor(v)}
    copies = []
    for _ in range(2):
        t0 = time.perf_counter()
        on_device = to_device(records, device)
        sync(device)
        copies.append(time.perf_counter() - t0)
    make_batch(on_device, spec)     # warm-up (allocator, kernels)
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = make_batch(on_device, spec)
        sync(device)
        times.append(time.perf_counter() - t0)
        del out
    return {"make_batch_median_s": statistics.median(times), "to_device_s": min(copies)}


def is_records(batch) -> bool:
    return isinstance(batch, dict) and torch.is_tensor(batch.get("images")) and "seed" in batch


# ----------------------------------------------------------------------------------------------


def run_path(path, workers, data, args, device, spec, env, make_batch_cache) -> dict:
    row = {"bench": "loader", "path": path, "workers": workers, "batch_size": args.batch_size,
           "scenes_per_s": None, "median_batch_s": None, "startup_s": None,
           "make_batch_scenes_per_s": None}
    shapes = {"height": args.height, "width": args.width, "views": NUM_VIEWS,
              "input_views": NUM_INPUT_VIEWS, "points": args.points, "entities": NUM_ENTITIES,
              "scenes": args.scenes, "batches": args.batches,
              "warmup": args.warmup if args.warmup is not None else workers + 1,
              "make_batch_device": device.type}
    row.update(shapes)
    # 1-minute load average before the row: other load on the machine, but also the tail of
    # this benchmark's previous row (its workers), so only a rough flag of a busy machine.
    row["loadavg_1m"] = os.getloadavg()[0]
    if path == "tfds":    # each worker streams its share; a new pass re-opens the TFDS reader
        row["scenes_per_worker_pass"] = args.scenes // max(1, workers)
    try:
        if path == "dali":
            if data.shards_png is None:
                raise RuntimeError("skipped: no png shards")
            loader, source = dali_loader(data, args, args.batch_size, workers, device)
        else:
            dataset, source = make_dataset(path, data, args)
            loader = torch_loader(dataset, args.batch_size, workers, device)
        row["source"] = source
        t = time_loader(loader, args.batches, row["warmup"], device)
        del loader
        batch = t.pop("last_batch")
        row.update(scenes_per_s=args.batch_size * args.batches / t["window_s"],
                   median_batch_s=t["median_batch_s"], startup_s=t["startup_s"],
                   mean_batch_s=t["mean_batch_s"])
        if path not in make_batch_cache:      # the same for every worker count
            if not is_records(batch):         # e.g. DALI yields something else
                make_batch_cache[path] = {"make_batch_note": f"{path} does not yield scene "
                                                             f"records; not timed"}
            else:
                make_batch_cache[path] = time_make_batch(batch, spec, device,
                                                         args.make_batch_repeat)
        mb = make_batch_cache[path]
        row.update(mb)
        if "make_batch_median_s" in mb:
            row["make_batch_scenes_per_s"] = args.batch_size / mb["make_batch_median_s"]
        if is_records(batch):
            views = int(batch["target_views"].shape[1])
            row["target_candidates"] = views * args.height * args.width
    except Exception as e:       # a row that says why, and the other paths still run
        msg = str(e)
        if isinstance(e, RuntimeError) and msg.startswith("skipped:"):
            row["skipped"] = msg[len("skipped:"):].strip()
        elif path == "dali":       # included only where it works
            row["skipped"] = (f"DaliShardLoader failed on {device.type}: "
                              f"{type(e).__name__}: {msg}")[:500]
        else:
            row["error"] = f"{type(e).__name__}: {msg}"[:500]
    row.update(env)
    return row


def print_table(rows: list) -> None:
    print(f"\nloader throughput ({rows[0]['views']} views of {rows[0]['height']}x"
          f"{rows[0]['width']}, {rows[0]['input_views']} inputs, {rows[0]['points']} rays, "
          f"batch {rows[0]['batch_size']}; make_batch on {rows[0]['make_batch_device']}; "
          f"{rows[0]['cpu_count']} CPUs, {rows[0]['device']})")
    print(f"{'path':11} {'workers':>7} {'scenes/s':>9} {'median_s':>9} {'mean_s':>8} "
          f"{'startup_s':>9} {'make_batch/s':>12}")
    for r in rows:
        head = f"{r['path']:11} {r['workers']:>7}"
        if r.get("skipped") or r.get("error"):
            why = f"skipped: {r['skipped']}" if r.get("skipped") else f"error: {r['error']}"
            print(f"{head} {why}")
            continue
        mb = r["make_batch_scenes_per_s"]
        print(f"{head} {r['scenes_per_s']:>9.1f} {r['median_batch_s']:>9.3f} "
              f"{r['mean_batch_s']:>8.3f} {r['startup_s']:>9.2f} "
              f"{(f'{mb:.1f}' if mb else '-'):>12}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.bench_loader",
                                description=__doc__.splitlines()[0])
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--workers", nargs="+", type=int, help="DataLoader workers (default 1 4 16; "
                   "--quick: 0 1); for dali, its num_threads")
    p.add_argument("--batch-size", type=int, help="scenes per batch (default 32; --quick 8)")
    p.add_argument("--batches", type=int, help="timed batches (default 20; --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed batches after the first (default "
                   "workers + 1)")
    p.add_argument("--scenes", type=int, help="scenes generated (default 256; --quick 32)")
    p.add_argument("--data-dir", default=os.path.join(ROOT, ".scratch", "bench_loader"))
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "loader.jsonl"))
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where make_batch runs (and pin_memory is used for cuda)")
    p.add_argument("--quick", action="store_true", help="few scenes and batches, same shapes")
    p.add_argument("--sizes-only", action="store_true",
                   help="make the shards and record their sizes on disk; time nothing")
    p.add_argument("--height", type=int, default=128, help="image height (testing: smaller)")
    p.add_argument("--width", type=int, default=128, help="image width (testing: smaller)")
    p.add_argument("--points", type=int, default=8192, help="target rays per scene")
    p.add_argument("--make-batch-repeat", type=int, help="timed make_batch calls (default 5; "
                   "--quick 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    defaults = ({"workers": [0, 1], "batch_size": 8, "batches": 3, "scenes": 32,
                 "make_batch_repeat": 2} if args.quick else
                {"workers": [1, 4, 16], "batch_size": 32, "batches": 20, "scenes": 256,
                 "make_batch_repeat": 5})
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.batches < 1 or args.batch_size < 1 or args.scenes < 1:
        p.error("--batches, --batch-size and --scenes must be positive")
    if any(w < 0 for w in args.workers):
        p.error("--workers must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    device = torch.device(args.device)
    env = environment()
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    env["cpu_model"] = cpu_model()
    env["cpu_count"] = os.cpu_count()
    env["torch_threads"] = torch.get_num_threads()
    spec = BatchSpec(num_points=args.points, num_entities=NUM_ENTITIES)
    data = prepare_data(args, args.paths)
    rows, make_batch_cache = [], {}

    def record(row: dict) -> None:          # appended as it comes: a crash keeps what was measured
        rows.append(row)
        if not args.no_save:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    if data.shards_raw:
        record(shard_sizes(data, args, env))
        print(f"shards of {args.scenes} scenes, {NUM_VIEWS} views of {args.width}x{args.height}: "
              f"raw {rows[-1]['raw_bytes'] / 2 ** 20:.1f} MiB, png {rows[-1]['png_bytes'] / 2 ** 20:.1f} MiB")
    for path in ([] if args.sizes_only else args.paths):
        for workers in args.workers:
            print(f"-- {path}, {workers} workers", flush=True)
            record(run_path(path, workers, data, args, device, spec, env, make_batch_cache))
    if not args.sizes_only:
        print_table([r for r in rows if r["bench"] == "loader"])
    if not args.no_save:
        print(f"rows appended to {args.out}")
    return rows


if __name__ == "__main__":
    main()
