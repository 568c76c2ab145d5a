"""Run directories (where a config trains, the folder's claim, its copy of the config, its log)
and train.py's command line (its flags, read into `TrainOptions`)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

from .files import WriteError, explain_write_error, remove_stale_temporaries
from .locks import LOCK_FILE, FolderLock


def append_log(run_dir: str, record: dict) -> None:
    path = os.path.join(run_dir, "log.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise WriteError(explain_write_error(e, path) or f"cannot append to {path}: {e}") from None


def run_dir_for(config_path: str, override: Optional[str] = None) -> str:
    """The reference's convention: a `config.yaml` trains in its folder; other configs in runs/<stem>."""
    if override:
        return override
    if os.path.basename(config_path) == "config.yaml":
        return os.path.dirname(os.path.abspath(config_path))
    return os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])


def output_dir_for(config_path: str, checkpoint: Optional[str] = None,
                   override: Optional[str] = None) -> str:
    """Where a command that reads a trained model writes (renders, metrics, slots, views): the
    config's run folder (`run_dir_for`), except for a --checkpoint from outside it, whose
    outputs go to runs/checkpoint-<its name>/, so they never mix with a run of the same config
    (configs/demo.pt with configs/demo.yaml: runs/checkpoint-demo/). `override`: --run-dir."""
    run_dir = run_dir_for(config_path, override)
    if override or not checkpoint:
        return run_dir
    if os.path.abspath(checkpoint).startswith(os.path.abspath(run_dir) + os.sep):
        return run_dir
    return os.path.join("runs", f"checkpoint-{os.path.splitext(os.path.basename(checkpoint))[0]}")


def claim_run_dir(run_dir: str) -> FolderLock:
    """Makes the run directory and takes its lock (held until the process ends); removes the
    temporary files of saves that a killed run left. A folder that cannot be written is a
    WriteError naming the cause."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = FolderLock(run_dir, what="run directory",
                          hint=", or train in another folder with --run-dir").acquire()
    except OSError as e:
        raise WriteError(explain_write_error(e, run_dir) or f"cannot use the run directory "
                         f"'{run_dir}': {e}") from None
    freed = remove_stale_temporaries(run_dir)
    if freed:
        print(f"Removed temporary files of interrupted saves from {run_dir} ({freed / 2**20:.1f} MB).")
    return lock


@contextlib.contextmanager
def claimed_run_dir(run_dir: str, config_path: str):
    """The run directory, claimed (`claim_run_dir`) with the config copied in, for the body of
    the `with`. A folder this made is removed again when the body fails, unless the run wrote
    something there (`remove_unstarted_run`)."""
    made = not os.path.exists(run_dir)
    lock, finished = claim_run_dir(run_dir), False
    try:
        copy_config(config_path, run_dir)
        print(f"Run directory: {run_dir}")
        yield run_dir
        finished = True
    finally:
        lock.release()
        if made and not finished:
            remove_unstarted_run(run_dir)


def remove_unstarted_run(run_dir: str) -> None:
    """A run folder left by a failure at start-up: removed while it holds only the copied config
    and the lock file (nothing trained), else left with a note."""
    left = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    if set(left) <= {"config.yaml", LOCK_FILE}:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        print(f"note: the run folder {run_dir} keeps what the failed run wrote: {', '.join(left)}",
              file=sys.stderr)


def copy_config(config_path: str, run_dir: str) -> None:
    """Copies the config into the run directory as config.yaml (saying so when it replaces a
    different copy); nothing when the config is the run's own config.yaml."""
    target = os.path.join(run_dir, "config.yaml")
    if os.path.abspath(target) == os.path.abspath(config_path):
        return
    if os.path.exists(target):
        with open(target, "rb") as f_old, open(config_path, "rb") as f_new:
            if f_old.read() != f_new.read():
                print(f"note: {config_path} differs from the run's {target}; replacing the run's copy")
    try:
        shutil.copyfile(config_path, target)
    except OSError as e:
        raise WriteError(explain_write_error(e, target) or f"cannot write {target}: {e}") from None


def start_wandb(cfg, run_dir: str, run_id: Optional[str]):
    """(the wandb module, logging this run, its run id); train.py has checked that wandb is
    installed before starting."""
    import wandb
    run_id = run_id or wandb.util.generate_id()
    wandb.init(project="osrt-fast", name=run_dir, id=run_id, resume="allow", config=cfg.to_dict())
    return wandb, run_id


class RunLog:
    """Where a run's records go: its log.jsonl and, with `wandb`, Weights and Biases (resuming
    the run `run_id`; `self.run_id` is the one to keep in checkpoints). Only the process that
    `writes` (the first) writes anything."""

    def __init__(self, cfg, run_dir: str, writes: bool, wandb: bool = False,
                 run_id: Optional[str] = None):
        self.run_dir, self.writes, self.wandb, self.run_id = run_dir, writes, None, run_id
        if wandb and writes:
            self.wandb, self.run_id = start_wandb(cfg, run_dir, run_id)

    def write(self, record: dict, step: int, wandb_record: Optional[dict] = None) -> None:
        """`record` to log.jsonl, and `wandb_record` (default `record`) to wandb at `step`."""
        if not self.writes:
            return
        append_log(self.run_dir, record)
        if self.wandb:
            self.wandb.log(record if wandb_record is None else wandb_record, step=step)


def resume_notes(path: str, extras: dict, t, schedule: dict, world_size: int) -> list:
    """What a run resumed from the checkpoint `path` (its `osrt_fast` entry: `extras`) should be
    told: a changed seed, learning-rate schedule or process count."""
    notes = []
    if "seed" in extras and extras["seed"] != t.seed:
        notes.append(f"warning: {path} was trained with training.seed {extras['seed']}, the config "
                     f"says {t.seed}: the batch stream from here on differs from the original run's")
    if extras.get("lr_scheduler") not in (None, schedule):
        notes.append(f"note: the LR schedule changed since {path} was written "
                     f"({extras['lr_scheduler']} -> {schedule}); using the config's")
    if extras.get("world_size", 1) != world_size:
        notes.append(f"note: {path} was written by {extras.get('world_size', 1)} process(es), this "
                     f"run has {world_size}; the global batch ({t.batch_size} scenes) is the same")
    return notes


@dataclass
class TrainOptions:
    """What a run does besides its config (train.py's flags; a trainer.Trainer takes them)."""
    exit_after: Optional[int] = None     # stop (saving) at this iteration, counted from the run's start
    max_minutes: Optional[float] = None  # stop (saving) once the run's training time reaches this
    eval_split: str = "val"              # 'test' reports on the test split (never selects on it)
    evaluate_first: bool = False         # evaluate before the first step
    visualize_first: bool = False        # visualise before the first step
    wandb: bool = False                  # log to Weights and Biases
    max_eval: Optional[int] = None       # evaluate on at most this many items
    full_scale: bool = False             # evaluate on every pixel of the target views
    print_model: bool = False            # print the model and its parameters
    final_look: bool = True              # a run stopped between evaluations evaluates and draws once

    @classmethod
    def from_args(cls, args) -> "TrainOptions":
        """The options of train.py's parsed command line (`parse_train_args`)."""
        return cls(args.exit_after, args.max_minutes, "test" if args.test else "val", args.evalnow,
                   args.visnow, args.wandb, args.max_eval, args.full_scale, args.print_model,
                   not args.no_final_look)


def _checked(text: str, parse, ok, expected: str):
    """`parse(text)` if it reads and `ok` accepts it, else argparse's error naming `expected`."""
    import argparse
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def whole_number(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return _checked(text, int, lambda v: v >= 0, "a whole number >= 0")


def positive_minutes(text: str) -> float:
    """argparse type: a number of minutes > 0."""
    import math
    return _checked(text, float, lambda v: v > 0 and math.isfinite(v), "a number of minutes > 0")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return _checked(text, int, lambda v: v >= 1, "a whole number >= 1")


def parse_train_args(argv=None):
    """train.py's command line (the reference's flags, and a few of ours)."""
    import argparse
    p = argparse.ArgumentParser(description="Train OSRT (the reference's train.py flags).")
    p.add_argument("config", help="Path to a config file (configs/*.yaml or a run's config.yaml).")
    p.add_argument("--exit-after", type=whole_number, metavar="N",
                   help="Stop (saving model.pt) at iteration N, counted from the run's start: a run "
                        "resumed at 1000 with --exit-after 1500 trains 500 more steps.")
    p.add_argument("--max-minutes", type=positive_minutes,
                   help="Stop (saving model.pt) once the run's training time, summed over all its "
                        "resumes as the log's 'time', reaches this many minutes.")
    p.add_argument("--test", action="store_true", help="Evaluate on the test split instead of val.")
    p.add_argument("--evalnow", action="store_true", help="Run evaluation on startup.")
    p.add_argument("--visnow", action="store_true", help="Run visualisation on startup.")
    p.add_argument("--wandb", action="store_true", help="Log to Weights and Biases (optional extra).")
    p.add_argument("--max-eval", type=positive_int, help="Limit the number of items in the evaluation set.")
    p.add_argument("--full-scale", action="store_true", help="Evaluate on full images.")
    p.add_argument("--print-model", action="store_true", help="Print the model and its parameters.")
    p.add_argument("--no-final-look", action="store_true",
                   help="When the run stops between its evaluations (--exit-after, --max-minutes, "
                        "Ctrl-C, SIGTERM), do not evaluate and draw its pictures once more after "
                        "saving (Ctrl-C during that skips it too).")
    p.add_argument("--run-dir", help="Run directory (default: the config's folder for config.yaml, "
                                     "else runs/<config name>).")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="Intra-op threads of the training process (default: OMP_NUM_THREADS if "
                        "set, else one per core less the cores other processes keep busy at the "
                        "start, chosen once for the run); fewer leaves cores to other work.")
    return p.parse_args(argv)


def require_wandb() -> None:
    """A ConfigError, before any work, where --wandb is asked for without the wandb package."""
    import importlib.util

    from .config import ConfigError
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb needs the wandb package, which is not installed: "
                          "pip install 'osrt-fast[wandb]', or leave --wandb out")

