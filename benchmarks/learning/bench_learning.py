"""Learning on the built-in scenes: validation PSNR, ARI and FG-ARI against steps, scenes seen
and wall time, for one config, drawn as curves.

    python -m benchmarks.learning.bench_learning --config configs/demo.yaml --minutes 10
        [--eval-every 100] [--max-eval 64] [--name demo] [--out DIR] [--run-dir DIR] [--no-save]
        [--resume-from CKPT] [--set peak_lr=3e-4 ...]

It trains with train.py itself, once per invocation (its run directory, default
benchmarks/results/learning/<name>/run, auto-resumes, so a long run can span several
invocations: run the same command again, with a larger --minutes or --steps; on another machine,
--resume-from the run's last checkpoint: the demo's run commits its log.jsonl, and its last
checkpoint is configs/demo.pt), evaluating every
--eval-every steps on the first --max-eval validation scenes. After each invocation it writes,
next to the run, `curves.json` (one point per evaluation: it, scenes seen, training seconds, val
psnr / ari / fg_ari and the slot usage (the largest slot's share, the slots' similarity); the
mean-image PSNR, the baseline a model must beat; the device, threads, torch version and commit),
`curves.png` (matplotlib, the `[bench]` extra) and the run's `config.yaml` (its data path
relative to the repository), and
appends a summary to benchmarks/results/learning.jsonl: steps and wall time to the first
FG-ARI >= 0.5 and >= 0.9, the best values, the machine.

Wall time is training time as train.py logs it (the steps, not evaluation); `wall_s` adds the
evaluations and start-up of every invocation, as a user waits for them.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import yaml

from benchmarks.common import RESULTS_DIR, ROOT, append_result, environment, recorded_path, set_option
from osrt_fast.signals import STOP_SIGNALS

THRESHOLDS = (0.5, 0.9)
# train.py's exit codes after a stop signal (it saved): 128 + the signal, as a shell reports them
INTERRUPTED = tuple(128 + int(s) for s in STOP_SIGNALS)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning.bench_learning",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--name", help="results folder name (default: the config's file name)")
    p.add_argument("--out", help="results folder (default benchmarks/results/learning/<name>)")
    p.add_argument("--run-dir", help="where the run lives (default <out>/run)")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/learning.jsonl")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="stop after this much training time in all")
    budget.add_argument("--steps", type=int, help="stop at this iteration")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-eval", type=int, default=64, help="validation scenes per evaluation")
    p.add_argument("--resume-from", metavar="CHECKPOINT",
                   help="a run without a model.pt starts from this checkpoint of the same config "
                        "(e.g. configs/demo.pt on a fresh clone, with the run's committed log)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="options, YAML values: training keys (peak_lr=3e-4 batch_size=16) or "
                        "dotted paths (model.encoder_kwargs.conv_init=he)")
    return p.parse_args(argv)


def prepare_run(args, run_dir: str) -> str:
    """The run's config.yaml: the given config with evaluation every --eval-every steps (the
    data path made absolute, so the run directory may be anywhere)."""
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    data = cfg.setdefault("data", {})
    if data.get("path") and not os.path.isabs(data["path"]):
        data["path"] = os.path.abspath(data["path"])
    t = cfg.setdefault("training", {})
    t.update(validate_every=args.eval_every, checkpoint_every=args.eval_every)
    for item in args.set:
        key, _, value = item.partition("=")
        set_option(cfg, key, yaml.safe_load(value))
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def read_log(run_dir: str) -> tuple:
    """(training records, validation records) of log.jsonl."""
    log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    return [r for r in log if "loss" in r], [r for r in log if r.get("split") == "val"]


def train_until(config: str, args, run_dir: str) -> int:
    """Runs train.py once to the budget: --steps as --exit-after, --minutes as --max-minutes
    (training time summed over the run's resumes); it evaluates every --eval-every steps
    itself. A run already past the budget only loads and exits. Returns train.py's exit code:
    0, or one of INTERRUPTED after Ctrl-C or another stop signal (train.py saved; the curves
    are still written)."""
    budget = (["--exit-after", str(args.steps)] if args.steps is not None
              else ["--max-minutes", str(args.minutes)] if args.minutes is not None else [])
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), config, *budget, "--max-eval", str(args.max_eval)]
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code != 0 and code not in INTERRUPTED:
        raise SystemExit(f"train.py failed (exit {code}); its output is above")
    return code


CURVE_KEYS = ("psnr", "ari", "fg_ari", "mse", "slot_max_share", "slot_similarity")


def curves(run_dir: str, batch_size: int) -> list:
    steps, evals = read_log(run_dir)
    seconds = {r["it"]: r["time"] for r in steps}

    def train_s(it: int):
        """Training seconds at step `it`: its log line's, or (an evaluation after a stop between
        log lines) the last logged step's before it."""
        if it in seconds:
            return seconds[it]
        return max(((i, t) for i, t in seconds.items() if i <= it), default=(0, None))[1]

    return [{"it": e["it"], "scenes_seen": e["it"] * batch_size, "train_s": train_s(e["it"]),
             **{k: e[k] for k in CURVE_KEYS if k in e}} for e in evals]


def mean_image_psnr(config: str, max_eval, max_train: int = 2000, split: str = "val") -> float:
    """The baseline a model must beat: the PSNR of predicting every pixel as its mean over the
    training split's images (up to `max_train` scenes), as val PSNR is computed (per scene, over
    the target views, averaged over the first `max_eval` scenes of `split`; None: all)."""
    import numpy as np

    from osrt_fast.config import load_config
    from osrt_fast.data import get_dataset, scene_records

    cfg = load_config(config).data
    train, scenes = get_dataset("train", cfg), get_dataset(split, cfg, max_len=max_eval)
    total, count = 0.0, 0
    for record in scene_records(train, range(min(max_train, train.num_scenes))):
        total, count = total + record["images"].astype(np.float64).sum(0), count + len(record["images"])
    mean = total / count / 255
    psnrs = []
    for record in scene_records(scenes, range(len(scenes))):
        views = record["images"][record["target_views"]].astype(np.float64) / 255
        psnrs.append(-10 * np.log10(np.mean((views - mean) ** 2)))
    return float(np.mean(psnrs))


def first_reaching(points: list, threshold: float):
    return next((p for p in points if p.get("fg_ari", 0.0) >= threshold), None)


def curves_title(name: str, config: str, sets: list, env: dict) -> str:
    return f"{name}: {config} {' '.join(sets)} ({env.get('device', '?')}, {env.get('commit', '?')})"


def draw(points: list, title: str, path: str, baseline=None) -> bool:
    """curves.png: val PSNR (and the mean image's, `baseline`), (FG-)ARI and the largest slot's
    share against steps; False (with a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: curves.png needs matplotlib: pip install 'osrt-fast[bench]'")
        return False
    its = [p["it"] for p in points]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(its, [p["psnr"] for p in points], marker=".")
    if baseline is not None:
        a.axhline(baseline, color="grey", lw=0.8, ls="--", label=f"mean image {baseline:.1f}")
        a.legend()
    a.set(xlabel="step", ylabel="val PSNR (dB)", title="reconstruction")
    for key, label in (("fg_ari", "FG-ARI"), ("ari", "ARI"), ("slot_max_share", "top slot's share")):
        if any(key in p for p in points):
            b.plot(its, [p.get(key, float("nan")) for p in points], marker=".", label=label,
                   ls=":" if key == "slot_max_share" else "-")
    for threshold in THRESHOLDS:
        b.axhline(threshold, color="grey", lw=0.5, ls="--")
    b.set(xlabel="step", ylabel="val", ylim=(-0.05, 1.05), title="segmentation")
    b.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(out: str, name: str, recorded: str, sets: list, points: list, baseline: float,
                  env: dict, save: bool = True, **totals) -> dict:
    """A run's results in `out`: curves.json (its points, the mean image's PSNR, the machine),
    curves.png, and a summary (the best values, steps and time to each FG-ARI threshold, plus
    `totals`) appended to benchmarks/results/learning.jsonl where `save`; returns the summary."""
    with open(os.path.join(out, "curves.json"), "w") as f:
        json.dump({"config": recorded, "set": sets, "mean_image_psnr": baseline,
                   "points": points, **env}, f, indent=1)
    draw(points, curves_title(name, recorded, sets, env), os.path.join(out, "curves.png"), baseline)
    summary = {"bench": "learning", "name": name, "config": recorded, "set": sets, **totals,
               "best_psnr": max((p["psnr"] for p in points), default=None),
               "mean_image_psnr": baseline,
               "best_fg_ari": max((p.get("fg_ari", 0.0) for p in points), default=None),
               "last": points[-1] if points else None, **env}
    for threshold in THRESHOLDS:
        hit = first_reaching(points, threshold)
        summary[f"to_fg_ari_{threshold}"] = {"it": hit["it"], "train_s": hit["train_s"]} if hit else None
    if save:
        append_result("learning", summary)
    print(json.dumps(summary, indent=1))
    return summary


def torch_threads() -> int:
    """The intra-op threads train.py ran with (OMP_NUM_THREADS where set, else torch's default)."""
    import torch
    return int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())


def save_config_copy(config: str, path: str) -> None:
    """The run's config beside its curves, with a data path inside the repository written
    relative to it (the run's own copy has it absolute), so the committed copy works anywhere."""
    with open(config) as f:
        cfg = yaml.safe_load(f)
    data_path = cfg.get("data", {}).get("path")
    if data_path and os.path.isabs(data_path) and data_path.startswith(ROOT + os.sep):
        cfg["data"]["path"] = os.path.relpath(data_path, ROOT)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def main(argv=None) -> int:
    args = parse(argv)
    name = args.name or os.path.splitext(os.path.basename(args.config))[0]
    out = args.out or os.path.join(RESULTS_DIR, "learning", name)
    run_dir = args.run_dir or os.path.join(out, "run")
    config = prepare_run(args, run_dir)
    if args.resume_from and not os.path.exists(os.path.join(run_dir, "model.pt")):
        if not os.path.isfile(args.resume_from):
            raise SystemExit(f"--resume-from {args.resume_from}: no such checkpoint")
        shutil.copy2(args.resume_from, os.path.join(run_dir, "model.pt"))
        print(f"starting from {args.resume_from}")
    start = time.perf_counter()
    code = train_until(config, args, run_dir)
    wall = time.perf_counter() - start
    with open(config) as f:
        batch_size = yaml.safe_load(f)["training"]["batch_size"]
    points = curves(run_dir, batch_size)
    env = {**environment(), "threads": torch_threads()}
    baseline = mean_image_psnr(config, args.max_eval)
    os.makedirs(out, exist_ok=True)
    copy = os.path.join(out, "config.yaml")
    save_config_copy(config, copy)      # what was trained, beside its curves
    # A config outside the repository (a temporary folder) is named by its copy beside the curves.
    recorded = recorded_path(args.config, copy)
    write_results(out, name, recorded, args.set, points, baseline, env, save=not args.no_save,
                  steps=points[-1]["it"] if points else 0,
                  train_s=points[-1]["train_s"] if points else 0, wall_s_this_invocation=wall)
    if code in INTERRUPTED:
        print("interrupted: the curves so far are written; run the same command to resume")
    return code


if __name__ == "__main__":
    sys.exit(main())
