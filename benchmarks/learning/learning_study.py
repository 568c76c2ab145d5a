"""The learning study: every variant tried on the way to configs/demo.yaml, each a learning-benchmark
run (benchmarks/learning/bench_learning.py) with its config and curves in
benchmarks/results/learning/<name>/ and a summary line in benchmarks/results/learning.jsonl.

    python -m benchmarks.learning.learning_study [--only NAME ...] [--list] [--steps N]
        [--threads T]
    python -m benchmarks.learning.learning_study --table | --write | --check

Variants are the demo config with a few options changed (`SET`), so each differs from the recipe
in what its name says; the ladder runs the slot-free SRT (encoder and decoder `srt`) on the same
data, from pure autoencoding (every view an input and a target) through fixed cameras to the
random cameras of the real task; the last few measure what more compute per step buys. They run
one after another (a run resumes where it stopped; a variant that fails, e.g. because another
study process is running it, is reported at the end and the others go on); with --threads 1,
two studies can share the 2-core CPU, e.g. `--only` halves in two shells.
docs/learning.md tabulates the results (`--write` puts the table there, `--check` says whether it
is current; a test runs --check).

`--family full` studies configs/full.yaml instead (the built-in scenes at full difficulty; its
variants run as the config runs, folded and bf16, and its table compares FG-ARI at equal steps);
a variant may start from another's checkpoint (a curriculum: FULL_STARTS), which then runs first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.common import RESULTS_DIR, ROOT, write_between_markers

RESULTS = os.path.join(RESULTS_DIR, "learning")
DEMO = os.path.join(ROOT, "configs", "demo.yaml")

# The slot-free SRT at the demo's widths: the recipe's ray encoding, normalisation and init; two
# conv blocks (8x8 tokens per view: its decoder attends to every token, so 16x16 would cost 4x).
SRT_ENCODER = ("model.encoder_kwargs={pos_start_octave: -5, pos_octaves: 5, ray_start_octave: -1, "
               "ray_octaves: 5, ray_param: plucker, image_mean: 0.22, image_std: 0.12, conv_init: he, "
               "num_conv_blocks: 2, num_att_blocks: 0, conv_dim: 16, latent_dim: 64, num_heads: 4, "
               "head_dim: 16, mlp_dim: 128}")
SRT_DECODER = ("model.decoder_kwargs={pos_start_octave: -5, pos_octaves: 5, ray_start_octave: -1, "
               "ray_octaves: 5, ray_param: plucker, latent_dim: 64, num_att_blocks: 2, num_heads: 4, "
               "render_hidden_dim: 64}")
# The same SRT with every option at the reference's default (exp_c's model without slots).
SRT_ENCODER_REFERENCE = ("model.encoder_kwargs={pos_start_octave: -5, conv_dim: 16, latent_dim: 64, "
                         "num_att_blocks: 2, num_heads: 4, head_dim: 16, mlp_dim: 128}")
SRT_DECODER_REFERENCE = ("model.decoder_kwargs={pos_start_octave: -5, latent_dim: 64, num_att_blocks: 2, "
                         "num_heads: 4, render_hidden_dim: 64}")
SRT = ["model.encoder=srt", "model.decoder=srt", "slot_balance=0", "model_selection_metric=psnr"]
AUTOENCODE = ["data.kwargs.num_input_views=4"]
FIXED = ["data.kwargs.cameras=fixed", "data.path=data/demo_scenes_fixed"]
REFERENCE_RAYS = ["model.encoder_kwargs.ray_param=camera", "model.decoder_kwargs.ray_param=camera"]

# How the study's runs computed (configs/demo.yaml's settings then): the eager model in fp32,
# scenes decoded by a loader process. configs/demo.yaml now runs the same model faster (the folded
# algebra, bf16 where native, cached scenes; docs/performance.md), with the same learning at 5000
# steps; every variant keeps these so that a rerun computes as the committed curves did. The
# recipe's slot-importance loss then faded out over 3000 steps, its schedule had no cooldown and
# its batch was 16 scenes (the config holds the loss for 10,000 steps and cools down since
# demo_balance_10000 ended ahead, and takes 32 scenes per step since demo_balance_10000_batch_32
# ended ahead of that).
STUDIED = ["model.backend=eager", "precision=fp32", "data.cache=false", "num_workers=1",
           "slot_balance_until=3000", "lr_cooldown=0", "batch_size=16"]

# Widths 128 instead of 64: slots, tokens, MLPs and the render MLP.
WIDTH_128 = ([f"model.encoder_kwargs.{k}={v}" for k, v in
              (("slot_dim", 128), ("latent_dim", 128), ("conv_dim", 32), ("mlp_dim", 256), ("head_dim", 32))] +
             [f"model.decoder_kwargs.{k}={v}" for k, v in (("slot_dim", 128), ("render_hidden_dim", 128))])

# name: (what it tests, --set options on top of STUDIED)
VARIANTS = {
    "recipe": ("nothing: configs/demo.yaml as it is (the study's baseline, at the study's threads "
               "and steps)", []),
    "ladder_a_autoencode_reference": (
        "slot-free SRT, every option the reference's, autoencoding 4 views",
        SRT + AUTOENCODE + [SRT_ENCODER_REFERENCE, SRT_DECODER_REFERENCE]),
    "ladder_a_autoencode": ("slot-free SRT, recipe options, autoencoding 4 views",
                            SRT + AUTOENCODE + [SRT_ENCODER, SRT_DECODER]),
    "ladder_b_fixed_cameras": ("slot-free SRT, recipe options, novel views, fixed cameras",
                               SRT + FIXED + [SRT_ENCODER, SRT_DECODER]),
    "ladder_c_random_cameras": ("slot-free SRT, recipe options, novel views, random cameras",
                                SRT + [SRT_ENCODER, SRT_DECODER]),
    "ladder_c_random_cameras_reference": (
        "slot-free SRT, every option the reference's, random cameras",
        SRT + [SRT_ENCODER_REFERENCE, SRT_DECODER_REFERENCE]),
    "recipe_fixed_cameras": ("the recipe on fixed cameras (a nearly 2D task)", FIXED),
    "no_plucker": ("camera position and direction (the reference's rays) instead of Pluecker",
                   REFERENCE_RAYS),
    "full_octaves": ("15 octaves each, direction from 0 (the reference's bands), Pluecker rays",
                     [f"model.{m}_kwargs.{k}={v}" for m in ("encoder", "decoder")
                      for k, v in (("pos_octaves", 15), ("ray_start_octave", 0), ("ray_octaves", 15))]),
    "no_image_norm": ("images in [0, 1] as the reference feeds them",
                      ["model.encoder_kwargs.image_mean=0.0", "model.encoder_kwargs.image_std=1.0"]),
    "no_he_init": ("PyTorch's default conv init (the reference's)", ["model.encoder_kwargs.conv_init=default"]),
    "no_slot_balance": ("without the slot-importance loss", ["slot_balance=0"]),
    "mixer_layer_norm": ("LayerNorm in the Slot Mixer's mixing block (the reference's `layer_norm` "
                         "option, as VideoSAUR's Slot Mixer configs use it)",
                         ["model.decoder_kwargs.layer_norm=true"]),
    "encoder_transformer": ("2 transformer blocks in the encoder (global mixing before slot attention)",
                            ["model.encoder_kwargs.num_att_blocks=2"]),
    "patches_8px": ("three conv blocks: 4x4 tokens of 8x8 pixels per view (the reference's stem)",
                    ["model.encoder_kwargs.num_conv_blocks=3"]),
    "spatial_broadcast": ("the spatial broadcast decoder instead of the Slot Mixer",
                          ["model.decoder=spatial_broadcast",
                           "model.decoder_kwargs={pos_start_octave: -5, pos_octaves: 5, ray_start_octave: -1, "
                           "ray_octaves: 5, ray_param: plucker, slot_dim: 64, hidden_dim: 64}"]),
    # What more compute buys (the shipped checkpoint's gap): per step, and per second
    "batch_32": ("32 scenes per step instead of 16 (2x the compute per step)", ["batch_size=32"]),
    "rays_1024": ("1024 target rays per scene instead of 512", ["data.num_points=1024"]),
    "width_128": ("widths 128 instead of 64 (slots, tokens, MLPs and the render MLP)", WIDTH_128),
    "lr_3e-4": ("peak learning rate 3e-4 instead of 1e-3", ["peak_lr=3e-4"]),
    "reference_options": ("every model option the reference's, no slot balance (the recipe's data, "
                          "widths and schedule)",
                          REFERENCE_RAYS + ["slot_balance=0"] +
                          [f"model.{m}_kwargs.{k}={v}" for m in ("encoder", "decoder")
                           for k, v in (("pos_octaves", 15), ("ray_start_octave", 0), ("ray_octaves", 15))] +
                          ["model.encoder_kwargs.image_mean=0.0", "model.encoder_kwargs.image_std=1.0",
                           "model.encoder_kwargs.conv_init=default", "model.encoder_kwargs.num_conv_blocks=3",
                           "model.encoder_kwargs.num_att_blocks=2"]),
}


# The full family: configs/full.yaml (the built-in scenes at full difficulty: the ground with
# shadows, 2-6 objects, 64x64) with what each name says changed, run as the config runs (folded,
# bf16, cached scenes). Runs whose data differ name their own data folder. The study ran with 7
# slots, as the config had them then (it has 10 since full_slots_10_long ended ahead): every run
# of the family adds FULL_STUDIED, so each variant is what it was.
FULL = os.path.join(ROOT, "configs", "full.yaml")
FULL_STUDIED = ["model.encoder_kwargs.num_slots=7"]
# For a while the recipe had one conv block; the variants run on it say so (compare them with
# full_one_conv_block at equal steps).
ONE_CONV = ["model.encoder_kwargs.num_conv_blocks=1"]
FULL_VARIANTS = {
    "full": ("nothing: configs/full.yaml with 7 slots (its first long run, the family's baseline)", []),
    "full_one_conv_block": ("one conv block: 32x32 tokens of 2x2 pixels per view (4x the tokens), "
                            "run to step 8975", ONE_CONV),
    "full_seed_1": ("nothing but the seed (training.seed 1: another init and order of batches): "
                    "how far runs differ by chance", ["seed=1"]),
    "full_zoom_1.0": ("the generator's default zoom 1.0 (objects 6-10 pixels wide) instead of 1.5",
                      ["data.kwargs.zoom=1.0", "data.path=data/full_scenes_zoom_1.0"]),
    "full_three_conv_blocks": ("three conv blocks: 8x8 tokens of 8x8 pixels per view",
                               ["model.encoder_kwargs.num_conv_blocks=3"]),
    "full_slots_10": ("10 slots instead of 7 (more spare slots)", ["model.encoder_kwargs.num_slots=10"]),
    "full_slot_iters_5": ("5 slot-attention iterations instead of 3", ["model.encoder_kwargs.slot_iters=5"]),
    "full_batch_32": ("32 scenes per step instead of 16", ["batch_size=32"]),
    "full_rays_1024": ("1024 target rays per scene instead of 512, on one conv block (compare with "
                       "full_one_conv_block)", ONE_CONV + ["data.num_points=1024"]),
    "full_width_128": ("widths 128 instead of 64 (slots, tokens, MLPs and the render MLP)", WIDTH_128),
    "full_warmup_2000": ("learning-rate warm-up over 2000 steps instead of 100 (Slot Attention warms "
                         "up over 10,000 of its 500,000)", ["lr_warmup=2000"]),
    "full_lr_5e-4": ("peak learning rate 5e-4 instead of 1e-3", ["peak_lr=5e-4"]),
    "full_balance_10000": ("the slot-importance loss faded out over 10,000 steps instead of 3000",
                           ["slot_balance_until=10000"]),
    "full_no_slot_balance": ("without the slot-importance loss", ["slot_balance=0"]),
    "full_plain": ("a plain background instead of the ground with shadows (what the ground costs)",
                   ["data.kwargs.background=plain", "data.path=data/full_scenes_plain"]),
    "full_objects_2_3_first": ("a curriculum's first phase: 2-3 objects (its 1000 steps start "
                               "full_objects_curriculum)",
                               ["data.kwargs.max_objects=3", "data.path=data/full_scenes_2_3"]),
    "full_objects_curriculum": ("a curriculum: 1000 steps on 2-3 objects (full_objects_2_3_first), "
                                "then 2-6", []),
    "full_32px_first": ("a curriculum's first phase: views of 32x32 (8x8 tokens per view; its 1000 "
                        "steps start full_size_curriculum)",
                        ["data.kwargs.height=32", "data.kwargs.width=32", "data.path=data/full_scenes_32px"]),
    "full_size_curriculum": ("a curriculum: 1000 steps on views of 32x32 (full_32px_first), then 64x64",
                             []),
}
# Runs that start from another run's checkpoint: name: (the run, its steps; run to exactly those)
FULL_STARTS = {"full_objects_curriculum": ("full_objects_2_3_first", 1000),
               "full_size_curriculum": ("full_32px_first", 1000)}

# Runs of other scripts that the tables list beside the variants: family: {name: (what it is, [])}.
OTHER_ROWS = {
    "demo": {"demo": ("configs/demo.yaml's first long run, to the end of its schedule, with the "
                      "slot-importance loss for 3000 steps and no cooldown (bench_learning; "
                      "configs/demo.pt until demo_balance_10000 replaced it; 2 threads, idle to step "
                      "12,500)", []),
             "reference_demo": ("the reference's own code (stelzner/osrt: its model at the paper's "
                                "widths, training step and schedule), the demo's data, batch and "
                                "rays, 30 minutes on one thread (bench_reference.py)", []),
             "demo_64": ("the demo's scenes at 64x64 with two conv blocks (16x16 tokens of 4x4 pixels), "
                         "a 32,000-step schedule cooled down over its last 6000 (bench_learning --set "
                         "data.kwargs.height=64 data.kwargs.width=64 model.encoder_kwargs.num_conv_blocks=2 "
                         "max_it=32000 lr_cooldown=6000); one thread beside the full family's run to step 12,120, "
                         "then two threads on the idle CPU", []),
             "demo_slots_6": ("6 slots instead of 4 (two more spare), run to step 10,000 (bench_learning "
                              "--set model.encoder_kwargs.num_slots=6 lr_cooldown=8000; the cooldown "
                              "would start at step 32,000); one thread beside demo_balance_10000", []),
             "demo_balance_10000": ("the slot-importance loss faded out over 10,000 steps instead of "
                                    "3000, and the last 8000 steps a linear cooldown of the rate to 0 "
                                    "(bench_learning --set slot_balance_until=10000 lr_cooldown=8000); "
                                    "one thread beside another run (configs/demo.pt until "
                                    "demo_balance_10000_batch_32 replaced it)", []),
             "demo_balance_10000_batch_32": ("demo_balance_10000's recipe at 32 scenes per step "
                                             "(--set batch_size=32 slot_balance_until=10000 "
                                             "lr_cooldown=8000); two threads, beside demo_balance_40000 "
                                             "and the measurements of the checkpoint it replaced to "
                                             "step 3839, then on the idle CPU (configs/demo.yaml "
                                             "since; the shipped configs/demo.pt)", []),
             "demo_balance_40000": ("the slot-importance loss faded out over the whole schedule, 40,000 "
                                    "steps, and the same cooldown (slot_balance_until=40000 "
                                    "lr_cooldown=8000); one thread beside demo_balance_10000, then "
                                    "beside a batch-32 run and the shipped checkpoint's measurements", [])},
    "full": {"full_cooldown_from_29k": ("the long run's step-29,000 checkpoint, its learning rate then cooled "
                                        "down linearly to 0 over 8000 steps (lr_cooldown=8000, max_it=37000)", []),
             "full_cooldown_from_40k": ("the long run's step-40,000 checkpoint cooled down over 8000 steps "
                                        "(lr_cooldown=8000, max_it=48000): the control of the next row", []),
             "full_slots_10_from_40k": ("the long run's step-40,000 checkpoint grown to 10 slots "
                                        "(grow_slots.py: 3 spare slots), cooled down over 8000 steps "
                                        "as the row above", []),
             "full_cooldown_16000_from_40k": ("the long run's step-40,000 checkpoint cooled down over "
                                              "16,000 steps (lr_cooldown=16000, max_it=56000)", []),
             "full_slots_10_long": ("10 slots instead of 7 from the start, on the recipe's whole schedule "
                                    "(configs/full.yaml since; the shipped configs/full.pt)", [])},
}

FAMILIES = {
    # family: (config, options every run adds, variants, runs that start from another, markers)
    "demo": (DEMO, STUDIED, VARIANTS, {}, "study-table"),
    "full": (FULL, FULL_STUDIED, FULL_VARIANTS, FULL_STARTS, "full-study-table"),
}


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning.learning_study",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=list(FAMILIES), default="demo",
                   help="'demo': configs/demo.yaml's study; 'full': configs/full.yaml's")
    p.add_argument("--only", nargs="*", help="run these variants (default: all)")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--table", action="store_true", help="print the results as a Markdown table")
    p.add_argument("--write", action="store_true",
                   help="write that table into docs/learning.md, between its study-table markers")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if docs/learning.md's table is not the results' table")
    p.add_argument("--plot", action="store_true",
                   help="draw the runs' curves in one figure, docs/<family>_study.png")
    p.add_argument("--steps", type=int, default=3000, help="steps per variant")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs")
    return p.parse_args(argv)


def run(family: str, name: str, steps: int, eval_every: int, threads) -> int:
    """Runs (or resumes) one variant; train.py's exit code. A variant that starts from another
    runs that one first, to exactly its steps."""
    config, studied, variants, starts, _ = FAMILIES[family]
    start = []
    if name in starts:
        first, first_steps = starts[name]
        code = run(family, first, first_steps, eval_every, threads)
        if code != 0:
            return code
        start = ["--resume-from", os.path.join(RESULTS, first, "run", "model.pt")]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    cmd = [sys.executable, "-m", "benchmarks.learning.bench_learning", "--config", config,
           "--name", name, "--steps", str(steps), "--eval-every", str(eval_every), "--max-eval", "64",
           *start, "--set", *studied, *variants[name][1]]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def fg_ari_at(points: list, it: int):
    """FG-ARI of the evaluation at step `it`, or None."""
    return next((p.get("fg_ari") for p in points if p["it"] == it), None)


def table_rows(names, variants: dict, at=None) -> list:
    """Markdown rows (linking from docs/learning.md): name, what it tests, steps, training minutes (the run's curves, summed over
    its resumes), best and last val PSNR over the mean image's, best and last FG-ARI, the top
    slot's share at the end; with `at`, FG-ARI at those steps too (runs compare at equal steps)."""
    rows = []
    for name in names:
        path = os.path.join(RESULTS, name, "curves.json")
        if not os.path.exists(path):
            continue
        c = json.load(open(path))
        pts = c["points"]
        if not pts:
            continue
        last, base = pts[-1], c.get("mean_image_psnr")
        best_psnr = max(p["psnr"] for p in pts)
        fg = [p.get("fg_ari") for p in pts if p.get("fg_ari") is not None]
        at_cells = "".join(f" {v:.2f} |" if (v := fg_ari_at(pts, it)) is not None else " - |"
                           for it in at or ())
        rows.append(f"| [`{name}`](../benchmarks/results/learning/{name}/curves.png) | {variants.get(name, ('',))[0]} | "
                    f"{last['it']} | {last.get('train_s', float('nan')) / 60:.1f} | "
                    f"{best_psnr:.2f} / {last['psnr']:.2f} ({base:.2f}) |" + at_cells
                    + (f" {max(fg):.2f} / {fg[-1]:.2f} | {last.get('slot_max_share', float('nan')):.2f} |"
                       if fg else " - | - |"))
    return rows


DOC = os.path.join(ROOT, "docs", "learning.md")
# The full family's runs compare at these steps (each run is evaluated there).
FULL_AT = (1000, 2000)


def markers(family: str) -> tuple:
    tag = FAMILIES[family][4]
    return (f"<!-- {tag}:begin (written by python -m benchmarks.learning.learning_study "
            + ("" if family == "demo" else f"--family {family} ") + "--write) -->", f"<!-- {tag}:end -->")


BEGIN, END = markers("demo")


def table(names, family: str = "demo") -> str:
    """The Markdown table of the variants' results (those with curves), then the runs of other
    scripts it lists (the family's own long run, the reference's)."""
    at = FULL_AT if family == "full" else ()
    others = OTHER_ROWS[family]
    described = {**FAMILIES[family][2], **others}
    names = list(names) + [n for n in others if n not in names]
    return "\n".join(["| run | what differs from the recipe | steps | training min | val PSNR best / "
                      "last (mean image) |" + "".join(f" FG-ARI at {it} |" for it in at)
                      + " val FG-ARI best / last | top slot's share |",
                      "| --- | --- | --- | --- | --- |" + " --- |" * len(at) + " --- | --- |"]
                     + table_rows(names, described, at))


def plot(names, family: str, path: str, last_step: int = 4000) -> bool:
    """One figure of the family's runs: val FG-ARI and PSNR against steps (to `last_step`), one
    line each, for comparing at equal steps; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: --plot needs matplotlib: pip install 'osrt-fast[bench]'")
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.4))
    for i, name in enumerate(names):
        f = os.path.join(RESULTS, name, "curves.json")
        if not os.path.exists(f):
            continue
        pts = [p for p in json.load(open(f))["points"] if p["it"] <= last_step and "fg_ari" in p]
        style = dict(lw=2.4, color="black") if name == family else dict(lw=1.1, ls="-" if i < 10 else "--")
        b.plot([p["it"] for p in pts], [p["fg_ari"] for p in pts], marker=".", label=name, **style)
        a.plot([p["it"] for p in pts], [p["psnr"] for p in pts], marker=".", label=name, **style)
    a.set(xlabel="step", ylabel="val PSNR (dB)", title="reconstruction")
    b.set(xlabel="step", ylabel="val FG-ARI", ylim=(-0.05, 1.0), title="segmentation")
    b.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"learning_study --family {family}: each run's first {last_step} steps (64 val scenes; "
                 "PSNR compares only runs on the same data)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse(argv)
    variants = FAMILIES[args.family][2]
    names = args.only or list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        print(f"unknown variant(s) {unknown}; known: {', '.join(variants)}", file=sys.stderr)
        return 2
    if args.list:
        for n in names:
            print(f"{n}: {variants[n][0]}")
        return 0
    if args.table:
        print(table(names, args.family))
        return 0
    if args.plot:
        path = os.path.join(ROOT, "docs", f"{args.family}_study.png")
        if plot(names, args.family, path):
            print(f"wrote {path}")
        return 0
    if args.write or args.check:
        begin, end = markers(args.family)
        text = open(DOC).read()
        if begin not in text or end not in text:
            print(f"{DOC} has no {FAMILIES[args.family][4]} markers", file=sys.stderr)
            return 2
        current = write_between_markers(DOC, begin, end, table(names, args.family), DOC, check=args.check)
        if args.check:
            if not current:
                print(f"{DOC}'s {args.family} study table is stale: python -m "
                      f"benchmarks.learning.learning_study --family {args.family} --write", file=sys.stderr)
            return 0 if current else 1
        print(f"wrote the {args.family} study table into {DOC}")
        return 0
    failed = [n for n in names if run(args.family, n, args.steps, args.eval_every, args.threads) != 0]
    if failed:      # e.g. a variant another study process is running (its run folder is locked)
        print(f"the study went on past these failed variants: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
