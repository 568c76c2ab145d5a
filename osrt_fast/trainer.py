"""Training: the reference's loop (schedule, checkpoints, evaluation, visualisation), exactly resumable.

`Trainer(cfg, run_dir, options)` is one run with everything built in `__init__` (data, model,
optimizer, the run folder's checkpoint resumed, loaders, guard, rates, log); `run()` trains and
saves. A step computes gradients (`step`), the guard judges its loss and gradient norm, then the
loop writes the checkpoints waiting for these weights (only once their loss is measured;
guards.py) and applies the step or skips it; `after_step` runs at every step, taken or skipped.
`train` runs a Trainer on one process or under torchrun; `main` is train.py's command line.
'it' counts completed steps, as in the reference; the batch stream is a function of
(training.seed, it) alone (`data/loaders.py`).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from . import parallel, process
from .checkpoint import (DamagedCheckpoint, capture_rng_state, load_checkpoint, restore_rng_state,
                         save_checkpoint)
from .config import Config, load_config, micro_batch_size
from .data import (DataError, batch_spec, first_records, get_dataset, is_stream, make_batch,
                   to_device, training_loaders)
from .errors import UserError, command, report
from .evaluate import compute_loss, evaluate
from .guards import CollapseWatch, DivergenceError, NonFiniteLossError, StepGuard
from .metrics import psnr
from .model import OSRT, model_of_config_file
from .progress import progress_bar, progress_fields
from .rendering import visualize
from .runs import (RunLog, TrainOptions, claimed_run_dir, parse_train_args, require_wandb,
                   resume_notes, run_dir_for)
from .schedule import LrSchedule, slot_balance_at
from .signals import GracefulStop
from .throughput import Throughput, peak_flops


@dataclass
class StepResult:
    """One step's global loss and gradient norm (0-d tensors), its learning rate, and its metric
    terms (name -> the micro-batches' means)."""
    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    terms: dict


class Trainer:
    """One training run in `run_dir` on this process (see the module docstring). `info` and
    `device`: the process group's place (parallel.init_distributed); default one process on
    the config's device."""

    def __init__(self, cfg: Config, run_dir: str, options: Optional[TrainOptions] = None,
                 info: Optional[parallel.DistInfo] = None, device=None):
        self.cfg, self.t, self.run_dir = cfg, cfg.training, run_dir
        self.options = options = options or TrainOptions()
        self.info = info = info or parallel.DistInfo()
        self.device = torch.device(device) if device is not None else parallel.resolve_device(self.t.device)
        self.say = print if info.is_main else (lambda *a, **k: None)
        self.micro = micro_batch_size(self.t, info.world_size)
        torch.manual_seed(self.t.seed)
        os.makedirs(run_dir, exist_ok=True)
        self.load_data()
        self.build_model()
        self.it, self.elapsed, self.run_id = 0, 0.0, None
        # Checkpoints of the current weights waiting for their loss to be measured (`run`).
        self.pending, self.saved_it, self.last_batch = [], None, None
        self.sign = 1 if self.t.model_selection_mode == "maximize" else -1
        self.best = -self.sign * math.inf
        self.looked = {}                 # "evaluate" / "visualize" -> the iteration last done
        self.resume()
        self.build_loaders()
        self.guard = StepGuard(self.t.max_nonfinite_steps, self.t.divergence)
        self.collapse = CollapseWatch()
        self.rates = Throughput(self.it, self.t.batch_size, cfg.data.num_points,
                                peak_flops(self.device, self.t.peak_tflops), info.world_size)
        self.run_log = RunLog(cfg, run_dir, info.is_main, options.wandb, self.run_id)
        self.max_it = options.exit_after if options.exit_after is not None else self.t.max_it
        self.bar = progress_bar(total=self.max_it, initial=self.it, desc="training", enabled=info.is_main)

    def load_data(self) -> None:
        """The training and evaluation sets; the first process prepares the data (e.g. generates
        the built-in scenes) before the others read it."""
        split = self.options.eval_split

        def load():
            self.say("Loading training set...")
            self.train_set = get_dataset("train", self.cfg.data)
            self.train_spec = batch_spec(self.cfg.data, self.train_set)
            self.say(f"Loading {split} set...")
            self.eval_set = get_dataset(split, self.cfg.data, max_len=self.options.max_eval)
            self.eval_spec = batch_spec(self.cfg.data, self.eval_set, self.options.full_scale)
        parallel.first_process_first(load, self.device, DataError("another process could not "
                                                                  "load the data (its message says why)"))
        if getattr(self.train_set, "cache", None) is not None:
            self.fill_cache()

    def fill_cache(self) -> None:
        """With data.cache, the training scenes decoded into memory before the first step."""
        t0, scenes = time.perf_counter(), self.train_set.split_scenes()
        with progress_bar(total=len(scenes), desc="caching scenes", unit="scene",
                          enabled=self.info.is_main) as bar:
            cached = self.train_set.fill_cache(bar)
        self.say(f"Cached {cached} training scenes in memory ({time.perf_counter() - t0:.1f} s).")

    def build_model(self) -> None:
        model = OSRT(self.cfg.model).to(self.device)
        model.check_device(self.device)
        if self.options.print_model and self.info.is_main:
            print(model.summary())
        self.num_params = model.parameter_counts()
        self.model = parallel.parallelize(model, self.t, self.info, self.device)
        self.schedule = LrSchedule.from_config(self.t)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=self.schedule(0), fused=True)

    def resume(self) -> None:
        """Continues from the run's model_<max_it>.pt or model.pt, if there is one: parameters,
        optimizer, iteration, best metric and RNG state. A damaged one (cut short, a changed byte,
        non-finite weights) is named and the next good one used: model.pt, then the model_<it>.pt
        backups, newest first; when every one is damaged, the first one's error (never a silent
        start from scratch)."""
        found = [p for p in (os.path.join(self.run_dir, f"model_{self.t.max_it}.pt"),
                             os.path.join(self.run_dir, "model.pt")) if os.path.exists(p)]
        if not found:
            return
        backups = sorted((int(m.group(1)), n) for n in os.listdir(self.run_dir)
                         for m in [re.fullmatch(r"model_(\d+)\.pt", n)] if m)
        found += [p for p in (os.path.join(self.run_dir, n) for _, n in reversed(backups))
                  if p not in found]
        first = None
        for path in found:
            try:
                state = load_checkpoint(path, self.model, self.optimizer, map_location="cpu")
                break
            except DamagedCheckpoint as e:
                first = first or e
                self.say(f"warning: {e}; trying the run's next checkpoint.")
        else:
            raise first
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
                 f"{self.device} ({torch.get_num_threads()} threads), {strategy}; global batch {t.batch_size} = {info.world_size} x "
                 f"{t.grad_accum} micro-batches of {self.micro} scenes; "
                 f"{parallel.resolve_precision(self.device, t.precision)}"
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

    @property
    def max_rays(self) -> int:
        return self.cfg.data.num_points * self.micro

    def checkpoint(self, name: str) -> None:
        # Every process takes part (FSDP gathers the state); the first writes. A step draws
        # nothing from torch's generators (ray samples are hashed), so this RNG state is the
        # one the step at `it` starts from.
        save_checkpoint(os.path.join(self.run_dir, name), self.model, self.optimizer, it=self.it,
                        epoch_it=self.it // max(1, len(self.train_set) // self.t.batch_size),
                        t=self.elapsed, loss_val_best=self.best, run_id=self.run_log.run_id,
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

    def final_save(self) -> None:
        """model.pt at the end of a run or on a stop request. No later step measures these
        weights, so their loss on the last step's batch does (the loader may be gone: a signal
        to the job stops its workers too): diverged weights are refused and the last good
        model.pt stays. Without a step in this run, the non-finite check on save remains."""
        if self.saved_it == self.it:
            return
        if self.last_batch is not None:
            with torch.no_grad(), parallel.autocast(self.device, self.t.precision):
                mse, _ = compute_loss(self.model, self.last_batch)
            why = self.guard.weights_are_sane(parallel.all_reduce_mean(mse.mean().float()))
            if why is not None:
                raise DivergenceError(f"not saving iteration {self.it}: the weights diverged ({why}).")
        self.pending.append("model.pt")
        self.save_checked()

    def evaluate(self) -> None:
        """Metrics on the evaluation split, logged under its name; a new best by the selection
        metric on the validation split is saved."""
        t, split = self.t, self.options.eval_split
        self.say(f"Evaluating on {split} ({len(self.eval_set)} items)...")
        self.looked["evaluate"] = self.it
        result = evaluate(self.model, self.eval_loader, self.device, self.eval_spec,
                          max_rays=self.max_rays, precision=t.precision)
        self.say(f"Evaluation at it={self.it}: " + ", ".join(
            f"{k}={v}" if isinstance(v, int) else f"{k}={v:.4f}" for k, v in result.items()))
        collapse = self.collapse.update(result.get("slot_max_share"), self.it)
        if collapse:
            self.say(collapse)
        self.run_log.write({"it": self.it, "split": split, **result}, self.it,
                           {f"{split}/{k}": v for k, v in result.items()})
        metric = result[t.model_selection_metric]
        if split == "val" and self.sign * (metric - self.best) > 0:      # never on --test's split
            self.best = metric
            self.checkpoint("model_best.pt")
            self.say(f"New best model ({t.model_selection_metric} {self.best:.4f}), saved model_best.pt")

    def visualize(self) -> None:
        self.looked["visualize"] = self.it
        for name, spec in (("val", self.eval_spec), ("train", self.train_spec)):
            path = os.path.join(self.run_dir, f"renders-{name}.png") if self.info.is_main else None
            visualize(self.model, make_batch(self.vis_records[name], spec), path, self.device,
                      max_rays=self.max_rays, precision=self.t.precision)
        self.say(f"Visualisations written to {self.run_dir}/renders-{{val,train}}.png")

    def step(self, batches) -> StepResult:
        """The gradients of one optimizer step over `grad_accum` micro-batches (the weights do not
        move). Loss averaged over processes, gradient norm global (clipped to grad_clip): every
        process judges the step alike, and a finite loss can still overflow in backward."""
        t = self.t
        lr = self.schedule(self.it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        losses, terms_sum = [], defaultdict(list)
        balance = slot_balance_at(t, self.it)
        for m in range(t.grad_accum):
            parallel.note_progress(self.it + 1, "loading its batch")
            batch = self.last_batch = make_batch(to_device(next(batches), self.device), self.train_spec)
            parallel.note_progress(self.it + 1, "in its forward pass")
            self.rates.count_flops(self.cfg.model, batch)
            with parallel.gradient_sync(self.model, m == t.grad_accum - 1):
                with parallel.autocast(self.device, t.precision):
                    mse, terms = compute_loss(self.model, batch, slot_balance=balance)
                loss = mse.mean()
                aux = terms.pop("aux_loss", None)
                parallel.note_progress(self.it + 1, "in its backward pass")
                ((loss if aux is None else loss + aux.mean()) / t.grad_accum).backward()
            losses.append(loss.detach().float())
            for k in TERMS_LOGGED:
                if k in terms:
                    terms_sum[k].append(terms[k].mean())
        parallel.note_progress(self.it + 1, "done")
        loss = parallel.all_reduce_mean(torch.stack(losses).mean())
        norm = parallel.grad_norm_and_clip(self.params, t.grad_clip).to(loss.device)
        return StepResult(loss, norm, lr, terms_sum)

    def train_step(self, batches, stop: GracefulStop) -> Optional[StepResult]:
        """One step of the loop: gradients, the guard's judgement, then (a good step) the
        checkpoints pending for the current weights, now that the step has measured their loss,
        and the optimizer step. Returns the step, or None when the guard skipped it (it raises
        after too many bad steps in a row). `it` counts the step either way."""
        result = self.step(batches)
        good = self.guard.step_is_good(result.loss, result.grad_norm, self.it)
        if good:
            self.save_checked()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        # A second Ctrl-C waits for this: a checkpoint never holds a half-applied step.
        with stop.critical():
            if good:
                self.optimizer.step()
            self.it += 1
        return result if good else None

    def log(self, step: StepResult) -> None:
        """Loss, PSNR, rates and MFU since the last log, to the bar, log.jsonl and wandb."""
        rec = {"it": self.it, "loss": step.loss.item(), "psnr": psnr(step.loss).item(), "lr": step.lr,
               "grad_norm": step.grad_norm.item(), **self.rates.read(self.it),
               "time": self.elapsed, "world_size": self.info.world_size}
        if step.terms:
            names = sorted(step.terms)
            means = parallel.all_reduce_mean(torch.stack([torch.stack(step.terms[k]).mean()
                                                          for k in names]))
            rec.update(zip(names, means.tolist()))
        postfix = progress_fields(rec)
        self.bar.set_postfix(**postfix, lr=f"{step.lr:.2e}")
        if self.bar.disable:          # no terminal (a log file): a plain line instead of the bar
            self.say(f"it {self.it}/{self.bar.total}: " + ", ".join(f"{k}={v}" for k, v in postfix.items()))
        self.run_log.write(rec, self.it)

    def after_step(self, step: Optional[StepResult]) -> None:
        """What is due at the iteration just reached, whether its step was taken or skipped
        (`step` None): the log line (taken steps only), checkpoints, evaluation, visualisation."""
        t, it = self.t, self.it
        if step is not None and ((t.print_every > 0 and it % t.print_every == 0) or it == self.max_it):
            self.log(step)
        # Written by the next good step, once it has measured these weights' loss (`train_step`).
        if t.checkpoint_every > 0 and it % t.checkpoint_every == 0:
            self.pending.append("model.pt")
        if t.backup_every > 0 and it % t.backup_every == 0:
            self.pending.append(f"model_{it}.pt")
        if t.validate_every > 0 and it % t.validate_every == 0:
            self.evaluate()
        if t.visualize_every > 0 and it % t.visualize_every == 0:
            self.visualize()

    def out_of_time(self) -> bool:
        """--max-minutes: the run's training time (over all its resumes) has reached it."""
        return self.options.max_minutes is not None and self.elapsed >= 60 * self.options.max_minutes

    def run(self) -> int:
        """Trains to `max_it` (or --exit-after, or the time budget), then saves. Returns a
        process exit code: 0, 128 + the signal's number after a stop request, 3 when the run
        diverged (nothing saved over the last good checkpoint)."""
        self.announce()
        self.model.train()
        start = self.it
        with GracefulStop() as stop:
            batches, code = iter(self.train_loader), 0
            try:
                if self.options.evaluate_first:
                    self.evaluate()
                if self.options.visualize_first:
                    self.visualize()
                while self.it < self.max_it and not self.out_of_time():
                    # Between steps, so a stop saves a consistent, resumable state; with several
                    # processes, all stop at the same step when any was asked.
                    if parallel.any_process(bool(stop.requested), self.device):
                        raise KeyboardInterrupt
                    t0 = time.perf_counter()
                    step = self.train_step(batches, stop)
                    self.elapsed += time.perf_counter() - t0
                    self.bar.update(1)
                    self.after_step(step)
            except KeyboardInterrupt:
                self.say(f"\nStopped at iteration {self.it}; saving {os.path.join(self.run_dir, 'model.pt')} ...")
                code = stop.exit_code
            except (NonFiniteLossError, DivergenceError) as e:
                return self.diverged(e)
            finally:
                self.bar.close()
            # Still under the handlers: the SIGTERM torchrun sends after a Ctrl-C must not cut
            # the save short.
            try:
                self.final_save()
            except DivergenceError as e:
                return self.diverged(e)
        # Out of the handlers: model.pt is saved, so a Ctrl-C here skips the rest at once.
        self.final_look(start)
        if code:
            self.say("Saved. Run the same command to resume.")
            return code
        reached = (f"the time budget ({self.elapsed / 60:.1f} of --max-minutes {self.options.max_minutes:g} "
                   f"min of training) at iteration {self.it}" if self.out_of_time() else f"iteration {self.it}")
        self.say(f"Reached {reached}; saved {os.path.join(self.run_dir, 'model.pt')}.")
        return 0

    def final_look(self, start: int) -> None:
        """A run that stops between its evaluations (--exit-after, --max-minutes, a signal)
        evaluates and draws its pictures once more at the iteration it reached, after saving, so
        a short run still shows what it learned. Not when this run took no step or they are
        off (validate_every / visualize_every 0), with --no-final-look, and Ctrl-C skips it."""
        t = self.t
        due = [(name, every) for name, every in (("visualize", t.visualize_every),
                                                 ("evaluate", t.validate_every))
               if every > 0 and self.looked.get(name) != self.it]
        if not self.options.final_look or self.it == start or not due:
            return
        self.say(f"Stopped between evaluations: one more at iteration {self.it} (Ctrl-C skips it).")
        try:
            for name, _ in due:
                getattr(self, name)()
        except KeyboardInterrupt:
            self.say("Skipped.")

    def diverged(self, e: Exception) -> int:
        print(f"error: {e} {self.resume_hint()}", file=sys.stderr)
        return DIVERGED_EXIT


def train(cfg: Config, run_dir: str, options: Optional[TrainOptions] = None) -> int:
    """The training loop, on one process or on each of several started by torchrun. Returns a
    process exit code."""
    info, device = parallel.init_distributed(parallel.resolve_device(cfg.training.device),
                                             cfg.training.collective_timeout_s)
    clean = False
    try:
        code = Trainer(cfg, run_dir, options, info, device).run()
        clean = True            # every process ends a run the same way, at the same step
        return code
    except UserError as e:
        if not info.distributed:
            raise
        # Said before the process group is torn down: once one process has exited, torchrun's
        # agent stops the others, and a teardown that waits on the gone peer would lose this.
        return report(e)
    except RuntimeError as e:
        timed_out = parallel.collective_timeout(e, cfg.training.collective_timeout_s) \
            if info.distributed else None
        if timed_out is None:
            raise
        return report(timed_out)
    finally:
        parallel.shutdown_distributed(clean)


# Metric terms of the training batches that go to the log (means over the step's scenes).
TERMS_LOGGED = ("ari", "fg_ari", "slot_max_share", "slot_similarity")
DIVERGED_EXIT = 3       # the run stopped on diverged weights; the last good checkpoint is kept


@command
def main(argv=None) -> int:
    args = parse_train_args(argv)
    options = TrainOptions.from_args(args)
    process.setup(args.threads)
    cfg = load_config(args.config)
    # Refused before any data is read or a run folder made: the model (on the meta device: no
    # memory, no time) and a missing optional extra.
    with torch.device("meta"):
        model_of_config_file(cfg.model, args.config)
    if options.wandb:
        require_wandb()
    run_dir = run_dir_for(args.config, args.run_dir)
    first = int(os.environ.get("RANK", 0)) == 0      # under torchrun, the first process claims it
    with claimed_run_dir(run_dir, args.config) if first else contextlib.nullcontext():
        return train(cfg, run_dir, options)
