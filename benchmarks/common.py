"""Shared benchmark helpers: environment record, timing, JSON-lines results, the models measured.
Model FLOPs and the GPUs' peaks are osrt_fast.throughput's (`model_flops_per_scene`, `PEAK_FLOPS`,
`peak_flops`), the count training logs MFU with."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import torch

# The repository's root: the scripts run from it (python -m benchmarks.<folder>.<script>).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")

# OSRT at the paper's widths with MSN-Hard's K = 32, and a tiny one for CPU smoke runs.
MSN_HARD_MODEL = {"encoder": "osrt", "encoder_kwargs": {"pos_start_octave": -5, "num_slots": 32},
                  "decoder": "slot_mixer", "decoder_kwargs": {"pos_start_octave": -5}}
TINY_MODEL = {
    "encoder": "osrt",
    "encoder_kwargs": {"pos_start_octave": -5, "num_slots": 5, "slot_dim": 32, "num_att_blocks": 1,
                       "conv_dim": 8, "latent_dim": 32, "num_heads": 2, "head_dim": 16, "mlp_dim": 64},
    "decoder": "slot_mixer",
    "decoder_kwargs": {"pos_start_octave": -5, "slot_dim": 32, "num_att_blocks": 1,
                       "render_hidden_dim": 32, "num_heads": 2},
}


def set_option(cfg: dict, key: str, value) -> None:
    """--set KEY=VALUE: a training key (`peak_lr`), or a dotted path from a section
    (`model.encoder_kwargs.ray_param`, `data.kwargs.num_input_views`)."""
    path = key.split(".")
    if path[0] not in ("data", "model", "training"):
        path = ["training"] + path
    node = cfg
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def recorded_path(*paths: str) -> str:
    """The name a result gives a file: the first of `paths` that lies inside the repository,
    relative to its root; else the first one's file name (a machine's own folders, a temporary
    one above all, never go into a committed result)."""
    for path in paths:
        full = os.path.abspath(path)
        if os.path.commonpath([full, ROOT]) == ROOT:
            return os.path.relpath(full, ROOT)
    return os.path.basename(paths[0])


def git_commit() -> str:
    """The checkout's commit (with -dirty for uncommitted changes to tracked files); without git
    or .git (the GPU machine gets no .git), what benchmarks/gpu/prepare_gpu.py wrote to
    .gpu/COMMIT."""
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                         stderr=subprocess.DEVNULL).decode().strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                        cwd=ROOT, stderr=subprocess.DEVNULL).strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        written = os.path.join(ROOT, ".gpu", "COMMIT")
        return open(written).read().strip() if os.path.exists(written) else "unknown"


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("OSRT_COMMIT") or git_commit(),
        "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def time_cuda(fn, warmup: int = 3, repeat: int = 10) -> list[float]:
    """Milliseconds per call of fn, timed with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def quantiles(times: list[float]) -> dict:
    t = torch.tensor(times)
    return {"median_ms": t.median().item(), "p20_ms": t.quantile(0.2).item(),
            "p80_ms": t.quantile(0.8).item()}


def between_markers(text: str, begin: str, end: str, block: str, where: str) -> str:
    """`text` with what stands between the marker lines `begin` and `end` replaced by `block`
    (a generated table); SystemExit naming `where` when the markers are missing."""
    if begin not in text or end not in text:
        raise SystemExit(f"{where} has no table markers ({begin} ... {end})")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block}\n{end}{tail}"


def write_between_markers(path: str, begin: str, end: str, block: str, where: str,
                          check: bool = False) -> bool:
    """Puts `block` between the markers of the file at `path` (between_markers); with `check`,
    writes nothing. True when the file held `block` there already."""
    text = open(path).read()
    new = between_markers(text, begin, end, block, where)
    if new != text and not check:
        with open(path, "w") as f:
            f.write(new)
    return new == text


def append_result(name: str, record: dict) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return path
