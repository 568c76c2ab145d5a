"""Training: the reference's loop (schedule, checkpoints, evaluation, visualisation), exactly resumable.

`Trainer` runs it in named phases: set-up (data, model, optimizer; `__init__`), `resume` from
the run directory's checkpoint, the loaders, then `run`, which repeats `step` (one optimizer
step) and `after_step` (log, queue saves, evaluate, visualise), and saves at the end or on a stop
request (Ctrl-C, SIGTERM, SIGUSR1). A checkpoint is written only once the weights it holds have
had their loss measured (`step`, `final_save`; guards.py). `train` runs it on one process or on
each of several started by torchrun; `main` is train.py's command line.
'it' in a checkpoint counts completed training steps, as in the reference; the batch stream is
a function of (training.seed, it) alone (`data/loaders.py`).
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections import defaultdict
from typing import Optional

import torch

from . import parallel
from .checkpoint import (CheckpointError, capture_rng_state, load_checkpoint,
                         remove_stale_temporaries, restore_rng_state, save_checkpoint)
from .config import Config, ConfigError, micro_batch_size
from .data import (DataError, batch_spec, first_records, get_dataset, is_stream, make_batch,
                   to_device, training_loaders)
from .evaluate import compute_loss, evaluate
from .files import WriteError
from .guards import CollapseWatch, DivergenceError, NonFiniteLossError, StepGuard
from .locks import LOCK_FILE, FolderLock, LockedError
from .metrics import psnr
from .model import OSRT, model_of_config_file
from .rendering import visualize
from .runs import (append_log, copy_config, parse_train_args, require_wandb, resume_notes, run_dir_for,
                   start_wandb)
from .schedule import LrSchedule
from .progress import progress_bar
from .signals import GracefulStop
from .throughput import Throughput, peak_flops


class Trainer:
    """One training run in `run_dir` on this process (see the module docstring)."""

    def __init__(self, cfg: Config, run_dir: str, args, info, device):
        self.cfg, self.t, self.run_dir, self.args, self.info, self.device = (
            cfg, cfg.training, run_dir, args, info, device)
        self.say = print if info.is_main else (lambda *a, **k: None)
        self.micro = micro_batch_size(self.t, info.world_size)
        torch.manual_seed(self.t.seed)
        os.makedirs(run_dir, exist_ok=True)
        self.eval_split = "test" if args.test else "val"
        self.load_data()
        self.build_model()
        self.it, self.elapsed, self.run_id = 0, 0.0, None
        # Checkpoints of the current weights waiting for their loss to be measured (`step`).
        self.pending, self.saved_it = [], None
        self.sign = 1 if self.t.model_selection_mode == "maximize" else -1
        self.best = -self.sign * math.inf

    # -- set-up -----------------------------------------------------------------------------

    def load_data(self) -> None:
        """The training and evaluation sets. The first process prepares the data (e.g. generates
        the built-in scenes) before the others read; every process learns of a failure, so all
        stop with a message (none waits forever)."""
        info, distributed = self.info, self.info.distributed
        for turn in (0, 1) if distributed else (0,):
            error = None
            if (turn == 0) == info.is_main:
                try:
                    self.say("Loading training set...")
                    self.train_set = get_dataset("train", self.cfg.data)
                    self.train_spec = batch_spec(self.cfg.data, self.train_set)
                    self.say(f"Loading {self.eval_split} set...")
                    self.eval_set = get_dataset(self.eval_split, self.cfg.data, max_len=self.args.max_eval)
                    self.eval_spec = batch_spec(self.cfg.data, self.eval_set, self.args.full_scale)
                except (ConfigError, DataError) as e:
                    if not distributed:
                        raise
                    error = e
            if distributed and not parallel.all_agree(error is None, self.device):
                if error is not None:
                    raise error
                raise DataError("another process could not load the data (its message says why)")

    def build_model(self) -> None:
        model = OSRT(self.cfg.model).to(self.device)
        model.check_device(self.device)
        if self.args.print_model and self.info.is_main:
            print(model)
            for name, p in model.named_parameters():
                print(f"{name:80}{str(list(p.shape)):20}{p.numel():10d}")
        self.num_params = (sum(p.numel() for p in model.encoder.parameters()),
                           sum(p.numel() for p in model.decoder.parameters()))
        self.model = parallel.parallelize(model, self.t, self.info, self.device)
        self.schedule = LrSchedule.from_config(self.t)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=self.schedule(0), fused=True)

    def resume(self) -> None:
        """Continues from the run's model_<max_it>.pt or model.pt, if there is one: parameters,
        optimizer, iteration, best metric and RNG state."""
        path = os.path.join(self.run_dir, f"model_{self.t.max_it}.pt")
        if not os.path.exists(path):
            path = os.path.join(self.run_dir, "model.pt")
        if not os.path.exists(path):
            return
        state = load_checkpoint(path, self.model, self.optimizer, map_location="cpu")
        self.it = self.saved_it = int(state.get("it", 0))
        self.elapsed, self.run_id = float(state.get("t", 0.0)), state.get("run_id")
        self.best = float(state.get("loss_val_best", self.best))
        extras = state.get("osrt_fast") or {}
        restore_rng_state(extras.get("rng"))
        for note in resume_notes(path, extras, self.t, self.schedule.state_dict(), self.info.world_size):
            self.say(note)
        self.say(f"Resumed from {path} at iteration {self.it} (lr {self.schedule(self.it):.3g}).")

    def announce(self) -> None:
        t, info = self.t, self.info
        strategy = f"{info.world_size} processes, {t.parallel.upper()}" if info.distributed else "1 process"
        regions = t.activation_checkpointing.enabled()
        n_enc, n_dec = self.num_params
        self.say(f"Parameters: encoder {n_enc:,}, decoder {n_dec:,}, total {n_enc + n_dec:,}. Device "
                 f"{self.device}, {strategy}; global batch {t.batch_size} = {info.world_size} x "
                 f"{t.grad_accum} micro-batches of {self.micro} scenes; {t.precision}"
                 f"{', compiled' if t.compile else ''}{f', checkpointing {regions}' if regions else ''}.")

    def build_loaders(self) -> None:
        """The training loader from `self.it`, the evaluation loader and the visualised scenes."""
        t = self.t
        eval_bs = t.eval_batch_size or max(1, t.batch_size // (8 * self.info.world_size))
        self.train_loader, self.eval_loader = training_loaders(
            self.train_set, self.eval_set, t, eval_bs, self.it, self.info, self.device,
            dali=self.cfg.data.loader == "dali")
        n = min(t.vis_scenes, len(self.eval_set), len(self.train_set))
        self.vis_records = {"val": first_records(self.eval_set, n), "train": first_records(self.train_set, n)}
        if is_stream(self.train_set) and self.it > 0:
            self.say(f"note: {self.cfg.data.dataset} is read as a stream, so the resumed run sees other "
                     f"scenes than the original would have (convert it to shards for exactly "
                     f"resumable runs)")

    # -- what a run does between steps ------------------------------------------------------

    @property
    def max_rays(self) -> int:
        return self.cfg.data.num_points * self.micro

    def checkpoint(self, name: str) -> None:
        # Every process takes part (FSDP gathers the state); the first one writes. A training
        # step draws nothing from torch's generators (ray samples are hashed from seeds), so
        # the state captured here is the one the step at `it` starts from.
        save_checkpoint(os.path.join(self.run_dir, name), self.model, self.optimizer, it=self.it,
                        epoch_it=self.it // max(1, len(self.train_set) // self.t.batch_size),
                        t=self.elapsed, loss_val_best=self.best, run_id=self.run_id,
                        extras={"lr_scheduler": self.schedule.state_dict(), "rng": capture_rng_state(),
                                "seed": self.t.seed, "world_size": self.info.world_size})
        if name == "model.pt":
            self.saved_it = self.it

    def save_checked(self) -> None:
        """Writes the checkpoints waiting for the current weights (`self.pending`): called once
        their loss was measured and found sane."""
        for name in dict.fromkeys(self.pending):
            self.checkpoint(name)
        self.pending.clear()

    def resume_hint(self) -> str:
        path = os.path.join(self.run_dir, "model.pt")
        where = (f"{path} (iteration {self.saved_it}) holds the last weights whose loss was checked"
                 if self.saved_it is not None else f"no checkpoint in {self.run_dir} was touched")
        return (f"{where}. Lower training.peak_lr or set training.grad_clip, check the data, and "
                f"run the same command to resume.")

    def final_save(self, batches) -> None:
        """model.pt at the end of a run or on a stop request. No later step measures these
        weights, so one micro-batch's loss does (no step is taken): diverged weights are
        refused and the last good model.pt stays."""
        if self.saved_it == self.it:
            return
        records = next(batches, None)    # None: a finite stream; the non-finite check on save remains
        if records is not None:
            batch = make_batch(to_device(records, self.device), self.train_spec)
            with torch.no_grad(), parallel.autocast(self.device, self.t.precision):
                mse, _ = compute_loss(self.model, batch)
            why = self.guard.weights_are_sane(parallel.all_reduce_mean(mse.mean().float()))
            if why is not None:
                raise DivergenceError(f"not saving iteration {self.it}: the weights diverged ({why}).")
        self.pending.append("model.pt")
        self.save_checked()

    def evaluate(self) -> None:
        """Metrics on the evaluation split, logged; a new best by the selection metric is saved."""
        t = self.t
        self.say(f"Evaluating on {self.eval_split} ({len(self.eval_set)} items)...")
        result = evaluate(self.model, self.eval_loader, self.device, self.eval_spec,
                          max_rays=self.max_rays, precision=t.precision)
        self.say(f"Evaluation at it={self.it}: " + ", ".join(
            f"{k}={v}" if isinstance(v, int) else f"{k}={v:.4f}" for k, v in result.items()))
        collapse = self.collapse.update(result.get("slot_max_share"), self.it)
        if collapse:
            self.say(collapse)
        if self.info.is_main:
            append_log(self.run_dir, {"it": self.it, "split": self.eval_split, **result})
        if self.wandb:
            self.wandb.log({f"val/{k}": v for k, v in result.items()}, step=self.it)
        metric = result[t.model_selection_metric]
        # The model is chosen on the validation split only: a test-split score (--test) is
        # reported, never used for selection.
        if self.eval_split == "val" and self.sign * (metric - self.best) > 0:
            self.best = metric
            self.checkpoint("model_best.pt")
            self.say(f"New best model ({t.model_selection_metric} {self.best:.4f}), saved model_best.pt")

    def visualize(self) -> None:
        for name, spec in (("val", self.eval_spec), ("train", self.train_spec)):
            path = os.path.join(self.run_dir, f"renders-{name}.png") if self.info.is_main else None
            visualize(self.model, make_batch(self.vis_records[name], spec), path, self.device,
                      max_rays=self.max_rays, precision=self.t.precision)
        self.say(f"Visualisations written to {self.run_dir}/renders-{{val,train}}.png")

    # -- the step ---------------------------------------------------------------------------

    def step(self, batches, stop: GracefulStop) -> Optional[dict]:
        """One optimizer step over `grad_accum` micro-batches; `self.it` counts it. Returns the
        step's loss, gradient norm, learning rate and mean ARI / FG-ARI, or None when the guard
        skipped it (a non-finite value or a spike; it raises after too many in a row). The
        checkpoints pending for the current weights are written once this step's loss has
        shown them sane, before the optimizer moves them."""
        t = self.t
        lr = self.schedule(self.it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        losses, terms_sum = [], defaultdict(list)
        balance = slot_balance_at(t, self.it)
        for m in range(t.grad_accum):
            batch = make_batch(to_device(next(batches), self.device), self.train_spec)
            self.rates.count_flops(self.cfg.model, batch)
            with parallel.gradient_sync(self.model, m == t.grad_accum - 1):
                with parallel.autocast(self.device, t.precision):
                    mse, terms = compute_loss(self.model, batch, slot_balance=balance)
                loss = mse.mean()
                aux = terms.pop("aux_loss", None)
                ((loss if aux is None else loss + aux.mean()) / t.grad_accum).backward()
            losses.append(loss.detach().float())
            for k in TERMS_LOGGED:
                if k in terms:
                    terms_sum[k].append(terms[k].mean())
        # One host sync per step for both checks: a finite loss can still overflow in the
        # backward pass. The loss is averaged over processes, the gradient norm is global, so
        # every process takes the same decision.
        loss = parallel.all_reduce_mean(torch.stack(losses).mean())
        norm = parallel.grad_norm_and_clip(self.params, t.grad_clip).to(loss.device)
        if not self.guard.step_is_good(loss, norm, self.it):
            self.optimizer.zero_grad(set_to_none=True)
            self.it += 1
            return None
        self.save_checked()
        # A second Ctrl-C waits for this: a checkpoint never holds a half-applied step.
        with stop.critical():
            self.optimizer.step()
            self.it += 1
        return {"loss": loss, "grad_norm": norm, "lr": lr, "terms": terms_sum}

    def log(self, step: dict) -> None:
        """Loss, PSNR, rates and MFU since the last log, to the bar, log.jsonl and wandb."""
        loss = step["loss"]
        rec = {"it": self.it, "loss": loss.item(), "psnr": psnr(loss).item(), "lr": step["lr"],
               "grad_norm": step["grad_norm"].item(), **self.rates.read(self.it),
               "time": self.elapsed, "world_size": self.info.world_size}
        if step["terms"]:
            names = sorted(step["terms"])
            means = parallel.all_reduce_mean(torch.stack([torch.stack(step["terms"][k]).mean()
                                                          for k in names]))
            rec.update(zip(names, means.tolist()))
        postfix = dict(loss=f"{rec['loss']:.4f}", psnr=f"{rec['psnr']:.2f}",
                       scenes_s=f"{rec['scenes_per_s']:.1f}", rays_s=f"{rec['rays_per_s']:.3g}")
        # The largest slot's share of the rays and the slots' mean cosine similarity: both near
        # 1 is the one-slot collapse (guards.CollapseWatch).
        for key, name in (("slot_max_share", "top_slot"), ("slot_similarity", "slot_sim")):
            if key in rec:
                postfix[name] = f"{rec[key]:.2f}"
        if "mfu" in rec:
            postfix["mfu"] = f"{rec['mfu']:.1%}"
        elif "tflops_per_s" in rec:
            postfix["tflops"] = f"{rec['tflops_per_s']:.3g}"
        self.bar.set_postfix(**postfix, lr=f"{step['lr']:.2e}")
        if self.bar.disable:          # no terminal (a log file): a plain line instead of the bar
            self.say(f"it {self.it}/{self.bar.total}: " + ", ".join(f"{k}={v}" for k, v in postfix.items()))
        if self.info.is_main:
            append_log(self.run_dir, rec)
        if self.wandb:
            self.wandb.log(rec, step=self.it)

    def after_step(self, step: dict, max_it: int) -> None:
        t, it = self.t, self.it
        if (t.print_every > 0 and it % t.print_every == 0) or it == max_it:
            self.log(step)
        # Written by the next step, once it has measured these weights' loss (`step`).
        if t.checkpoint_every > 0 and it % t.checkpoint_every == 0:
            self.pending.append("model.pt")
        if t.backup_every > 0 and it % t.backup_every == 0:
            self.pending.append(f"model_{it}.pt")
        if t.validate_every > 0 and it % t.validate_every == 0:
            self.evaluate()
        if t.visualize_every > 0 and it % t.visualize_every == 0:
            self.visualize()

    # -- the loop ---------------------------------------------------------------------------

    def out_of_time(self) -> bool:
        """--max-minutes: the run's training time (over all its resumes) has reached it."""
        return self.args.max_minutes is not None and self.elapsed >= 60 * self.args.max_minutes

    def run(self) -> int:
        """Resumes, then trains to `max_it` (or --exit-after). Returns a process exit code."""
        self.resume()
        max_it = self.args.exit_after if self.args.exit_after is not None else self.t.max_it
        self.announce()
        self.wandb = None
        if self.args.wandb and self.info.is_main:
            self.wandb, self.run_id = start_wandb(self.cfg, self.run_dir, self.run_id)
        self.build_loaders()
        self.bar = progress_bar(total=max_it, initial=self.it, desc="training", enabled=self.info.is_main)
        self.guard = StepGuard(self.t.max_nonfinite_steps, self.t.divergence)
        self.collapse = CollapseWatch()
        self.rates = Throughput(self.it, self.t.batch_size, self.cfg.data.num_points,
                                peak_flops(self.device, self.t.peak_tflops), self.info.world_size)
        self.model.train()
        with GracefulStop() as stop:
            batches = iter(self.train_loader)
            code = 0
            try:
                if self.args.evalnow:
                    self.evaluate()
                if self.args.visnow:
                    self.visualize()
                while self.it < max_it and not self.out_of_time():
                    # Checked between steps, so a stop request saves a consistent, resumable
                    # state; with several processes, all stop at the same step when any was asked.
                    requested = bool(stop.requested)
                    if self.info.distributed:
                        requested = not parallel.all_agree(not requested, self.device)
                    if requested:
                        raise KeyboardInterrupt
                    t0 = time.perf_counter()
                    step = self.step(batches, stop)
                    self.bar.update(1)
                    if step is None:
                        continue
                    self.elapsed += time.perf_counter() - t0
                    self.after_step(step, max_it)
            except KeyboardInterrupt:
                self.say(f"\nStopped at iteration {self.it}; saving "
                         f"{os.path.join(self.run_dir, 'model.pt')} ...")
                code = stop.exit_code
            except (NonFiniteLossError, DivergenceError) as e:
                self.bar.close()
                print(f"error: {e} {self.resume_hint()}", file=sys.stderr)
                return 3
            self.bar.close()
            # Still under the handlers: the SIGTERM torchrun sends after a Ctrl-C must not
            # cut the save short.
            try:
                self.final_save(batches)
            except DivergenceError as e:
                print(f"error: {e} {self.resume_hint()}", file=sys.stderr)
                return 3
        if code:
            self.say("Saved. Run the same command to resume.")
            return code
        reached = (f"the time budget ({self.elapsed / 60:.1f} of --max-minutes {self.args.max_minutes:g} "
                   f"min of training) at iteration {self.it}" if self.out_of_time() else f"iteration {self.it}")
        self.say(f"Reached {reached}; saved {os.path.join(self.run_dir, 'model.pt')}.")
        return 0


def check_before_work(cfg: Config, args) -> None:
    """What can be refused before any data is read or a run directory made: the model's keys
    (built on the meta device: no memory, no time) and a missing optional extra."""
    with torch.device("meta"):
        model_of_config_file(cfg.model, args.config)
    if args.wandb:
        require_wandb()


def train(cfg: Config, run_dir: str, args) -> int:
    """The training loop, on one process or on each of several started by torchrun. Returns a
    process exit code."""
    info, device = parallel.init_distributed(parallel.resolve_device(cfg.training.device))
    clean = False
    try:
        code = Trainer(cfg, run_dir, args, info, device).run()
        clean = True            # every process ends a run the same way, at the same step
        return code
    except ERRORS as e:
        if not info.distributed:
            raise
        # Said before the process group is torn down: once one process has exited, torchrun's
        # agent stops the others, and a teardown that waits on the gone peer would lose this.
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        parallel.shutdown_distributed(clean)


ERRORS = (ConfigError, DataError, CheckpointError, LockedError, WriteError)

# Metric terms of the training batches that go to the log (means over the step's scenes).
TERMS_LOGGED = ("ari", "fg_ari", "slot_max_share", "slot_similarity")


def slot_balance_at(t, it: int) -> float:
    """training.slot_balance at iteration `it`: falling linearly to 0 over slot_balance_until
    steps, where that is set."""
    if t.slot_balance_until <= 0:
        return t.slot_balance
    return t.slot_balance * max(0.0, 1.0 - it / t.slot_balance_until)


def claim_run_dir(run_dir: str) -> FolderLock:
    """Makes the run directory and takes its lock (held until the process ends); removes the
    temporary files of saves that a killed run left. A folder that cannot be written is a
    WriteError naming the cause."""
    from .files import explain_write_error
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


def main(argv=None) -> int:
    from .config import load_config
    args = parse_train_args(argv)
    lock, made, failed = None, None, True
    try:
        cfg = load_config(args.config)
        check_before_work(cfg, args)
        run_dir = run_dir_for(args.config, args.run_dir)
        if int(os.environ.get("RANK", 0)) == 0:      # under torchrun, the first process
            made = None if os.path.exists(run_dir) else run_dir
            lock = claim_run_dir(run_dir)
            copy_config(args.config, run_dir)
            print(f"Run directory: {run_dir}")
        code = train(cfg, run_dir, args)
        failed = False
        return code
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()
        if failed and made:
            remove_unstarted_run(made)


def remove_unstarted_run(run_dir: str) -> None:
    """A run folder this invocation made, left by a failure at start-up: removed while it holds
    only the copied config and the lock file (nothing trained), else left with a note."""
    left = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    if set(left) <= {"config.yaml", LOCK_FILE}:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        print(f"note: the run folder {run_dir} keeps what the failed run wrote: {', '.join(left)}",
              file=sys.stderr)
