"""Run directories: where a config trains, its copy of the config, and its log."""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from .files import WriteError, explain_write_error


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


def parse_train_args(argv=None):
    """train.py's command line (the reference's flags, and a few of ours)."""
    import argparse
    p = argparse.ArgumentParser(description="Train OSRT (the reference's train.py flags).")
    p.add_argument("config", help="Path to a config file (configs/*.yaml or a run's config.yaml).")
    p.add_argument("--exit-after", type=int, metavar="N",
                   help="Stop (saving model.pt) at iteration N, counted from the run's start: a run "
                        "resumed at 1000 with --exit-after 1500 trains 500 more steps.")
    p.add_argument("--max-minutes", type=float,
                   help="Stop (saving model.pt) once the run's training time, summed over all its "
                        "resumes as the log's 'time', reaches this many minutes.")
    p.add_argument("--test", action="store_true", help="Evaluate on the test split instead of val.")
    p.add_argument("--evalnow", action="store_true", help="Run evaluation on startup.")
    p.add_argument("--visnow", action="store_true", help="Run visualisation on startup.")
    p.add_argument("--wandb", action="store_true", help="Log to Weights and Biases (optional extra).")
    p.add_argument("--max-eval", type=int, help="Limit the number of items in the evaluation set.")
    p.add_argument("--full-scale", action="store_true", help="Evaluate on full images.")
    p.add_argument("--print-model", action="store_true", help="Print the model and its parameters.")
    p.add_argument("--run-dir", help="Run directory (default: the config's folder for config.yaml, "
                                     "else runs/<config name>).")
    return p.parse_args(argv)


def require_wandb() -> None:
    """A ConfigError, before any work, where --wandb is asked for without the wandb package."""
    import importlib.util

    from .config import ConfigError
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb needs the wandb package, which is not installed: "
                          "pip install 'osrt-fast[wandb]', or leave --wandb out")

