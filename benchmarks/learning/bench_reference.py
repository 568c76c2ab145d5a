"""The reference's own training on the built-in scenes, beside this project's learning curves.

    python -m benchmarks.learning.bench_reference --reference PATH [--config configs/demo.yaml]
        [--minutes 30 | --steps N] [--eval-every 25] [--max-eval 64] [--name reference_demo]

PATH is a checkout of stelzner/osrt. Its code is imported from there and runs unmodified: its
model (`osrt.model.OSRT`, the paper's widths; the reference has no width options), its training
step (`SRTTrainer.train_step`: MSE, backward, Adam, fp32) and its learning-rate schedule
(`LrScheduler` in its train.py, peak 1e-4, warm-up `--lr-warmup` steps, 5000 as its CLEVR3D
config). Only the data come from here: the reference's CLEVR3D reader is fixed to CLEVR's
240x320 images, 3 views and scene numbers, so the built-in scenes of `--config` are batched by
this project's loader into the reference's batch (input_images, input_camera_pos, input_rays,
target_pixels, target_camera_pos, target_rays, target_masks), `--config`'s batch size and rays
per scene. The model keeps the reference's options except the slots (`--config`'s) and
pos_start_octave -5 (as its CLEVR3D and MSN configs set).

Every --eval-every steps the reference's weights are evaluated by this project's evaluator (the
eager model loads reference checkpoints and gives the reference's outputs: docs/faithfulness.md)
on the first --max-eval validation scenes, as train.py evaluates, so the curves compare point for
point with bench_learning's. The run (`<out>/run/model.pt`, the reference's checkpoint format,
and `log.jsonl`) resumes when run again; Ctrl-C saves. Writes curves.json, curves.png and a summary
line in benchmarks/results/learning.jsonl, as bench_learning does.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time

from benchmarks.common import RESULTS_DIR, ROOT, environment, recorded_path
from benchmarks.gpu.suite import import_reference, reference_model_config
from benchmarks.learning.bench_learning import (mean_image_psnr, save_config_copy, torch_threads,
                                                write_results)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning.bench_reference",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, metavar="PATH", help="a checkout of stelzner/osrt")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"),
                   help="the data, batch size, rays per scene and slots to train with")
    p.add_argument("--name", default="reference_demo")
    p.add_argument("--out", help="results folder (default benchmarks/results/learning/<name>)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="stop after this much training time in all")
    budget.add_argument("--steps", type=int, help="stop at this step")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--max-eval", type=int, default=64)
    p.add_argument("--lr-warmup", type=int, default=5000,
                   help="the schedule's warm-up (the reference's CLEVR3D config: 5000; its default 2500)")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/learning.jsonl")
    return p.parse_args(argv)


def import_reference_training(path: str):
    """(OSRT, SRTTrainer, LrScheduler) of the reference checkout at `path`."""
    ReferenceOSRT, SRTTrainer = import_reference(path)
    # Its train.py runs only under __main__; loaded under another name, so that it cannot be
    # taken for this project's train.py.
    spec = importlib.util.spec_from_file_location("reference_train", os.path.join(path, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ReferenceOSRT, SRTTrainer, module.LrScheduler


def evaluate_reference(ref_model, ours, loader, spec, device) -> dict:
    """This project's evaluation of the reference's current weights: `ours`, this project's
    eager model of the same config, loaded with them."""
    import torch

    from osrt_fast.evaluate import evaluate
    ours.encoder.load_state_dict(ref_model.encoder.state_dict())
    ours.decoder.load_state_dict(ref_model.decoder.state_dict())
    with torch.no_grad():
        return evaluate(ours, loader, device, spec, progress=False)


def save(path: str, ref_model, optimizer, it: int, train_s: float) -> None:
    """The reference's checkpoint dict (encoder, decoder, optimizer, it) plus the training
    seconds, written atomically."""
    import torch
    tmp = path + ".tmp"
    torch.save({"encoder": ref_model.encoder.state_dict(), "decoder": ref_model.decoder.state_dict(),
                "optimizer": optimizer.state_dict(), "it": it, "t": train_s}, tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse(argv)
    import torch
    import yaml

    from osrt_fast import OSRT
    from osrt_fast.config import load_config, model_config_from_any
    from osrt_fast.data import batch_spec, get_dataset
    from osrt_fast.data.loaders import loader_options, record_loader
    from osrt_fast.data.records import make_batch

    out = args.out or os.path.join(RESULTS_DIR, "learning", args.name)
    run_dir = os.path.join(out, "run")
    os.makedirs(run_dir, exist_ok=True)
    cfg = load_config(args.config)
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    ReferenceOSRT, SRTTrainer, LrScheduler = import_reference_training(args.reference)
    device = torch.device("cpu")
    model_cfg = reference_model_config(cfg.model.encoder_kwargs["num_slots"])
    torch.manual_seed(0)
    ref_model = ReferenceOSRT(model_cfg).to(device)
    ours = OSRT(model_config_from_any(model_cfg)).to(device)            # scores ref_model's weights
    schedule = LrScheduler(peak_lr=1e-4, peak_it=args.lr_warmup, decay_it=4_000_000, decay_rate=0.16)
    optimizer = torch.optim.Adam(ref_model.parameters(), lr=schedule.get_cur_lr(0))
    trainer = SRTTrainer(ref_model, optimizer, {"training": {}}, device, run_dir, {})

    ckpt, log_path = os.path.join(run_dir, "model.pt"), os.path.join(run_dir, "log.jsonl")
    it, train_s = 0, 0.0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=device, weights_only=True)
        ref_model.encoder.load_state_dict(state["encoder"])
        ref_model.decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        it, train_s = state["it"], state["t"]
        print(f"resuming the reference's run at step {it} ({train_s / 60:.1f} min of training)")
    points = [json.loads(line) for line in open(log_path)] if os.path.exists(log_path) else []
    points = [p for p in points if p["it"] <= it]

    train_set, eval_set = get_dataset("train", cfg.data), get_dataset("val", cfg.data, max_len=args.max_eval)
    train_spec, eval_spec = batch_spec(cfg.data, train_set), batch_spec(cfg.data, eval_set)
    options = loader_options(0, device)
    t = cfg.training
    batches = iter(record_loader(train_set, t.batch_size, options, train=True, seed=t.seed, start_it=it))
    eval_loader = record_loader(eval_set, t.eval_batch_size, options, train=False)

    def done() -> bool:
        return (args.steps is not None and it >= args.steps) or \
               (args.minutes is not None and train_s >= 60 * args.minutes)

    def evaluate_now() -> None:
        result = evaluate_reference(ref_model, ours, eval_loader, eval_spec, device)
        point = {"it": it, "scenes_seen": it * t.batch_size, "train_s": train_s,
                 **{k: result[k] for k in ("psnr", "ari", "fg_ari", "mse", "slot_max_share",
                                           "slot_similarity") if k in result}}
        points.append(point)
        with open(log_path, "a") as f:
            f.write(json.dumps(point) + "\n")
        print(f"eval at step {it} ({train_s / 60:.1f} min): psnr {point['psnr']:.2f}, "
              f"fg_ari {point.get('fg_ari', float('nan')):.3f}", flush=True)

    stop = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        if not points:
            evaluate_now()
        while not done() and not stop:
            for group in optimizer.param_groups:
                group["lr"] = schedule.get_cur_lr(it)
            batch = make_batch(next(batches), train_spec)
            t0 = time.perf_counter()
            loss, _ = trainer.train_step(batch, it)
            train_s += time.perf_counter() - t0
            it += 1
            if it % 5 == 0:
                print(f"it {it}: loss {loss:.4f}, {t.batch_size / (time.perf_counter() - t0):.2f} "
                      f"scenes/s, {train_s / 60:.1f} min", flush=True)
            if it % args.eval_every == 0 or done():
                save(ckpt, ref_model, optimizer, it, train_s)
                evaluate_now()
    except KeyboardInterrupt:
        print("interrupted: saving")
    finally:
        signal.signal(signal.SIGTERM, previous)
        save(ckpt, ref_model, optimizer, it, train_s)

    config_copy = os.path.join(out, "config.yaml")
    save_config_copy(args.config, config_copy)
    with open(config_copy) as f:
        copied = yaml.safe_load(f)
    copied["model"] = model_cfg
    copied["training"] = {"batch_size": t.batch_size, "lr_warmup": args.lr_warmup, "decay_it": 4_000_000,
                          "peak_lr": 1e-4, "note": "the reference's own training (bench_reference.py)"}
    with open(config_copy, "w") as f:
        yaml.safe_dump(copied, f, sort_keys=False)
    env = {**environment(), "threads": torch_threads()}
    baseline = mean_image_psnr(args.config, args.max_eval)
    recorded = recorded_path(args.config, config_copy)
    sets = [f"reference={os.path.basename(os.path.normpath(args.reference))}"]
    write_results(out, args.name, recorded, sets, points, baseline, env, save=not args.no_save,
                  steps=it, train_s=train_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
