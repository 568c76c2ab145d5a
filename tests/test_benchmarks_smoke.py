"""The benchmark scripts run end to end (tiny shapes, CPU, Triton interpreter) and print the rows
they promise. No timing is asserted: these check the scripts, not the speed."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow      # left out by the quick run (pytest -m "not slow"); CI runs it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("fp32", "bf16")
OPS = ("slot_attention_step", "slot_cross_attention", "slot_mix_render")


def run_module(module: str, *args: str) -> str:
    """stdout of `python -m <module> <args>` from the repository root; fails the test on a
    non-zero exit."""
    # CPU only (hidden GPUs keep both scripts on the path the smoke check is about), Triton in
    # its interpreter, set before the scripts import any kernel.
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"{module} {' '.join(args)} exited with {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc.stdout


def table(stdout: str, key_fields: int) -> dict:
    """Printed table rows keyed by their first key_fields columns -> the remaining columns."""
    rows = {}
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) > key_fields:
            rows[tuple(fields[:key_fields])] = fields[key_fields:]
    return rows


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def has_triton_backend() -> bool:
    from osrt_fast.model import OSRT
    return hasattr(OSRT, "set_backend")


def assert_measured(rows: dict, key: tuple) -> None:
    assert key in rows, f"row {key} missing from the table"
    assert is_number(rows[key][0]), f"row {key} has no time: {' '.join(rows[key])}"


def assert_skipped(rows: dict, key: tuple) -> None:
    assert key in rows, f"row {key} missing from the table"
    assert "skipped:" in rows[key], f"row {key} should be skipped: {' '.join(rows[key])}"


# ----------------------------------------------------------------------------------------------
# python -m benchmarks.speed.bench_kernels --smoke

@pytest.fixture(scope="module")
def kernel_rows():
    """bench | name | path | dtype | mode -> the rest of the row."""
    return table(run_module("benchmarks.speed.bench_kernels", "--smoke", "--no-save"), 5)


def test_bench_kernels_ops(kernel_rows):
    for dtype in DTYPES:
        for op in OPS:
            for mode in ("fwd", "bwd", "fwdbwd"):
                assert_measured(kernel_rows, ("op", op, "triton", dtype, mode))
                assert_measured(kernel_rows, ("op", op, "eager", dtype, mode))
                assert_skipped(kernel_rows, ("op", op, "compile", dtype, mode))


def test_bench_kernels_model_eager(kernel_rows):
    for dtype in DTYPES:
        assert_measured(kernel_rows, ("block", "decoder", "eager", dtype, "fwdbwd"))
        assert_measured(kernel_rows, ("block", "slot_attention", "eager", dtype, "fwdbwd"))
        assert_skipped(kernel_rows, ("block", "decoder", "compile", dtype, "fwdbwd"))
        assert_measured(kernel_rows, ("render", "frame", "eager", dtype, "fwd"))
    assert_measured(kernel_rows, ("encoder", "transformer", "sdpa", "bf16", "fwdbwd"))
    assert_skipped(kernel_rows, ("encoder", "transformer", "xformers", "bf16", "fwdbwd"))


def test_bench_kernels_model_triton(kernel_rows):
    if not has_triton_backend():
        pytest.skip("osrt_fast.model.OSRT has no set_backend(): no model-level triton backend yet")
    for dtype in DTYPES:
        assert_measured(kernel_rows, ("block", "decoder", "triton", dtype, "fwdbwd"))
        assert_measured(kernel_rows, ("block", "slot_attention", "triton", dtype, "fwdbwd"))
        assert_measured(kernel_rows, ("render", "frame", "triton", dtype, "fwd"))


# ----------------------------------------------------------------------------------------------
# python -m benchmarks.speed.bench_activation_memory --small

@pytest.fixture(scope="module")
def memory_rows():
    """path | dtype -> bytes/ray, KiB/scene, MiB const, GiB@32x8192, ratios."""
    return table(run_module("benchmarks.speed.bench_activation_memory", "--no-save", "--small"), 2)


def test_bench_activation_memory_eager(memory_rows):
    for dtype in DTYPES:
        assert_measured(memory_rows, ("eager", dtype))
        assert float(memory_rows[("eager", dtype)][0]) > 0      # something is saved per ray


def test_bench_activation_memory_triton(memory_rows):
    if not has_triton_backend():
        pytest.skip("osrt_fast.model.OSRT has no set_backend(): no model-level triton backend yet")
    for dtype in DTYPES:
        assert_measured(memory_rows, ("triton", dtype))
        assert float(memory_rows[("triton", dtype)][0]) > 0


# ----------------------------------------------------------------------------------------------
# python -m benchmarks.speed.bench_train_step --smoke

def test_bench_train_step_command_line():
    """The script's own loop (search, table) on the baseline and the checkpointed fast path; the
    suite's smoke test (tests/test_suite.py) runs its step for every path."""
    rows = table(run_module("benchmarks.speed.bench_train_step", "--smoke", "--no-save",
                            "--paths", "eager-fp32", "fast-ckpt"), 2)
    for path in ("eager-fp32", "fast-ckpt"):
        for bench in ("train_step", "train_step_largest"):
            key = (bench, path)
            assert key in rows, f"row {key} missing"
            scenes, rays, ms, scenes_s = rows[key][:4]
            assert int(scenes) == 2 and int(rays) == 32
            assert float(ms) > 0 and float(scenes_s) > 0
    assert rows[("train_step", "eager-fp32")][-1] == "1.00x"


def test_bench_train_step_counts_the_model_flops_training_logs():
    """Its FLOPs (so its and the suite's MFU) are osrt_fast.throughput's count: at MSN-Hard shapes
    within 1% of docs/flop_model.md's 3 x 395 G per scene; a row has model TFLOP/s, and MFU
    against a peak where one is known."""
    import types

    import torch

    from benchmarks.common import MSN_HARD_MODEL, TINY_MODEL
    from benchmarks.speed import bench_train_step as bts
    assert abs(bts.step_flops_per_scene(MSN_HARD_MODEL, (5, 128, 8192)) / (3 * 395.4e9) - 1) < 0.01
    shape = (2, 16, 32)
    args = types.SimpleNamespace(model=TINY_MODEL, slots=5, compile_backend=None, warmup=0,
                                 repeat=1, flops_per_scene=bts.step_flops_per_scene(TINY_MODEL, shape),
                                 peak=1e12)
    rec = bts.measure("eager-fp32", 2, args, {}, shape, torch.device("cpu"))
    assert rec["tflops_per_s"] == pytest.approx(args.flops_per_scene * rec["scenes_per_s"] / 1e12)
    assert rec["mfu"] == pytest.approx(rec["tflops_per_s"] * 1e12 / args.peak)


# ----------------------------------------------------------------------------------------------
# python -m benchmarks.learning.bench_learning

def test_bench_learning_records_curves_and_resumes(tmp_path):
    """Two invocations: the second resumes the run and adds its evaluations to the curves."""
    import json

    import yaml
    from conftest import tiny_model_config
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": "procedural", "path": str(tmp_path / "data"), "num_points": 32,
                 "kwargs": {"num_scenes": 12, "height": 16, "width": 16, "num_views": 3,
                            "min_objects": 2, "max_objects": 3, "zoom": 1.5}},
        "model": tiny_model_config(),
        "training": {"batch_size": 2, "num_workers": 0, "visualize_every": 0, "lr_warmup": 1,
                     "eval_batch_size": 4, "vis_scenes": 1, "device": "cpu"}}))
    common = ["--config", str(config), "--eval-every", "1", "--max-eval", "4", "--out",
              str(tmp_path / "out"), "--no-save"]
    run_module("benchmarks.learning.bench_learning", "--steps", "2", *common)
    run_module("benchmarks.learning.bench_learning", "--steps", "3", *common)
    curves = json.load(open(tmp_path / "out" / "curves.json"))
    assert [p["it"] for p in curves["points"]] == [1, 2, 3]
    assert all({"psnr", "ari", "fg_ari", "scenes_seen", "train_s"} <= set(p) for p in curves["points"])
    assert curves["points"][-1]["scenes_seen"] == 6 and curves["device"] and curves["commit"]
    assert curves["config"] == "tiny.yaml"          # config and copy outside the repository
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "out" / "curves.png").stat().st_size > 0
    except ImportError:
        pass
    # another machine: a fresh run folder continues from the run's last checkpoint
    moved = ["--config", str(config), "--eval-every", "1", "--max-eval", "4", "--out",
             str(tmp_path / "moved"), "--no-save", "--resume-from", str(tmp_path / "out" / "run" / "model.pt")]
    assert "starting from" in run_module("benchmarks.learning.bench_learning", "--steps", "4",
                                         *moved)
    curves = json.load(open(tmp_path / "moved" / "curves.json"))
    assert [p["it"] for p in curves["points"]] == [4] and curves["points"][0]["scenes_seen"] == 8


def test_bench_reference_trains_the_reference_code_and_resumes(tmp_path):
    """bench_reference on a stand-in checkout (tests/fixtures/reference_standin: the reference's
    class names and LrScheduler): evaluations at steps 0-2, then a second invocation resumes the
    saved run and adds step 3; the curves and the config copy name the reference's model."""
    import json

    import yaml
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": "procedural", "path": str(tmp_path / "data"), "num_points": 16,
                 "kwargs": {"num_scenes": 12, "height": 16, "width": 16, "num_views": 3,
                            "min_objects": 2, "max_objects": 3, "zoom": 1.5}},
        "model": {"encoder": "osrt", "encoder_kwargs": {"num_slots": 3}, "decoder": "slot_mixer"},
        "training": {"batch_size": 1, "num_workers": 0, "eval_batch_size": 2, "device": "cpu"}}))
    standin = os.path.join(ROOT, "tests", "fixtures", "reference_standin")
    common = ["--reference", standin, "--config", str(config), "--eval-every", "1", "--max-eval", "2",
              "--out", str(tmp_path / "out"), "--no-save", "--lr-warmup", "1"]
    run_module("benchmarks.learning.bench_reference", "--steps", "2", *common)
    assert "resuming the reference's run at step 2" in run_module(
        "benchmarks.learning.bench_reference", "--steps", "3", *common)
    curves = json.load(open(tmp_path / "out" / "curves.json"))
    assert [p["it"] for p in curves["points"]] == [0, 1, 2, 3]
    assert all({"psnr", "fg_ari", "train_s"} <= set(p) for p in curves["points"])
    assert curves["points"][-1]["scenes_seen"] == 3 and curves["set"] == ["reference=reference_standin"]
    copied = yaml.safe_load(open(tmp_path / "out" / "config.yaml"))
    assert copied["model"]["encoder_kwargs"] == {"pos_start_octave": -5, "num_slots": 3}
    assert copied["training"]["peak_lr"] == 1e-4


def test_bench_generalise_evaluates_a_checkpoint_on_new_scenes(tiny_run, tmp_path, monkeypatch, capsys):
    """bench_generalise on a tiny run: its conditions (zooms around the trained one, 1-3 input
    views, objects from the most trained to beyond K - 1), and three of them evaluated, new
    scenes generated where a condition needs its own."""
    import yaml
    from benchmarks.learning import bench_generalise
    config, data = tiny_run
    checkpoint = os.path.join(os.path.dirname(config), "model.pt")
    todo = bench_generalise.conditions(data, num_slots=4)
    assert {"test split", "unseen seed", "zoom 0.7", "zoom 1.3", "1 input view", "2 input views", "3 input views",
            "3 objects", "4 objects", "5 objects"} == set(todo)
    monkeypatch.setattr(bench_generalise, "GENERATED", str(tmp_path / "generated"))
    monkeypatch.setattr(bench_generalise, "SCENES", 20)
    assert bench_generalise.main(["--config", config, "--checkpoint", checkpoint, "--items", "4",
                                  "--no-save", "--only", "unseen seed", "1 input view", "4 objects"]) == 0
    out = capsys.readouterr().out
    for name in ("unseen seed", "1 input view", "4 objects"):
        assert f"{name}: PSNR" in out and "on 4 items" in out.split(f"{name}: PSNR")[1].split("\n")[0]
    generated = yaml.safe_load(open(tmp_path / "generated" / "config-objects4" / "generator.json"))
    assert generated["min_objects"] == generated["max_objects"] == 4
    assert bench_generalise.main(["--config", config, "--only", "nonsense"]) == 2


def test_results_name_no_folder_outside_the_repository(tmp_path):
    """A result names a file by its path in the repository (a config outside it, by its copy
    beside the curves), never by a machine's folder; no committed result does."""
    import re

    from benchmarks.common import RESULTS_DIR, recorded_path
    copy = os.path.join(RESULTS_DIR, "learning", "exp_a", "config.yaml")
    assert recorded_path(str(tmp_path / "a.yaml"), copy) == "benchmarks/results/learning/exp_a/config.yaml"
    assert recorded_path(os.path.join(ROOT, "configs", "demo.yaml"), copy) == "configs/demo.yaml"
    assert recorded_path(str(tmp_path / "a.yaml")) == "a.yaml"
    machine_path = re.compile(r"(?<![\w.])/(?:tmp|home|root|work|mnt|Users)/|\.\./")
    # A learning run's own folder (run/, git-ignored but for the demo's log) is not a result.
    found = [os.path.relpath(os.path.join(folder, f), ROOT)
             for folder, _, files in os.walk(RESULTS_DIR) if os.path.basename(folder) != "run"
             for f in files if f.endswith((".json", ".jsonl", ".yaml", ".md", ".txt"))
             and machine_path.search(open(os.path.join(folder, f), errors="replace").read())]
    assert not found, f"results that name a machine's folder: {found}"


def test_bench_learning_writes_the_curves_of_an_interrupted_run(tmp_path, monkeypatch):
    """train.py stopped by a signal (it saved, exit 130): the curves so far are still written and
    the exit code passed on; any other failure stops with its code named."""
    import subprocess as sp
    import types
    from benchmarks.learning import bench_learning
    args = types.SimpleNamespace(steps=5, minutes=None, max_eval=4)
    monkeypatch.setattr(sp, "run", lambda *a, **k: types.SimpleNamespace(returncode=130))
    assert bench_learning.train_until("c.yaml", args, str(tmp_path)) == 130
    monkeypatch.setattr(sp, "run", lambda *a, **k: types.SimpleNamespace(returncode=1))
    with pytest.raises(SystemExit, match="exit 1"):
        bench_learning.train_until("c.yaml", args, str(tmp_path))


def test_bench_pretrained_evaluates_a_checkpoint(tiny_run, tmp_path):
    """bench_pretrained: the evaluation of a checkpoint on a split, beside the mean image."""
    from benchmarks.learning import bench_pretrained
    config, _ = tiny_run
    checkpoint = os.path.join(os.path.dirname(config), "model.pt")
    row = bench_pretrained.main(["--config", config, "--checkpoint", checkpoint, "--split", "val",
                                 "--max-eval", "3", "--no-save"])
    assert row["scenes"] == 3 and row["it"] == 2 and len(row["sha256"]) == 12
    assert 0 < row["psnr"] < 60 and 0 < row["mean_image_psnr"] < 60 and -1 <= row["fg_ari"] <= 1


def test_bench_slot_usage_records_the_slot_shares(tiny_run):
    """bench_slot_usage trains the tiny config from scratch: one point per --every steps and the
    last, each slot's share of the weight (sorted, summing to 1)."""
    from benchmarks.learning import bench_slot_usage
    config, _ = tiny_run
    rows = bench_slot_usage.main(["--config", config, "--steps", "3", "--every", "2", "--warmup",
                                  "2", "--set", "decoder_kwargs.layer_norm=true", "--no-save"])
    assert [r["it"] for r in rows] == [0, 2]
    for r in rows:
        shares = r["slot_shares"]
        assert len(shares) == 3 and shares == sorted(shares, reverse=True)
        assert abs(sum(shares) - 1) < 1e-3 and 1 / 3 - 1e-6 <= r["max_weight"] <= 1


# python -m benchmarks.learning.learning_study and bench_init_signal.py

def test_every_study_variant_is_a_valid_config(tmp_path):
    """Each variant's --set options, applied to configs/demo.yaml as bench_learning applies them,
    give a config that loads and a model that builds (on the meta device), differing from the
    recipe where the variant says (the baseline, 'recipe', nowhere)."""
    import types

    import torch
    import yaml
    from benchmarks.learning import bench_learning, learning_study
    from osrt_fast import OSRT
    from osrt_fast.config import load_config
    as_studied = types.SimpleNamespace(config=learning_study.DEMO, eval_every=250,
                                       set=learning_study.STUDIED)
    recipe = load_config(bench_learning.prepare_run(as_studied, str(tmp_path / "as_studied")))

    def comparable(cfg) -> dict:
        """What a variant may change: not the evaluation cadence or the data path's spelling
        (bench_learning sets both)."""
        d = cfg.to_dict()
        for key in ("validate_every", "checkpoint_every"):
            d["training"].pop(key)
        d["data"]["path"] = os.path.relpath(d["data"]["path"], ROOT) if os.path.isabs(d["data"]["path"]) else d["data"]["path"]
        return d

    assert learning_study.main(["--list"]) == 0
    for name, (_, sets) in learning_study.VARIANTS.items():
        args = types.SimpleNamespace(config=learning_study.DEMO, eval_every=250,
                                     set=learning_study.STUDIED + sets)
        cfg = load_config(bench_learning.prepare_run(args, str(tmp_path / name)))
        with torch.device("meta"):
            OSRT(cfg.model)
        assert (comparable(cfg) != comparable(recipe)) == (name != "recipe"), name
    cfg = yaml.safe_load(open(tmp_path / "no_plucker" / "config.yaml"))
    assert cfg["model"]["encoder_kwargs"]["ray_param"] == cfg["model"]["decoder_kwargs"]["ray_param"] == "camera"
    assert cfg["training"]["validate_every"] == 250
    assert learning_study.main(["--only", "nonsense"]) == 2


def test_every_full_study_variant_is_a_valid_config(tmp_path):
    """The full family's variants (learning_study --family full) on configs/full.yaml as the
    study ran it (7 slots): each loads, builds, and differs from the recipe (the baseline 'full'
    nowhere); a curriculum starts from a variant of the family, on the same model."""
    import types

    import torch
    from benchmarks.learning import bench_learning, learning_study
    from osrt_fast import OSRT
    from osrt_fast.config import load_config
    configs = {}
    for name, (_, sets) in learning_study.FULL_VARIANTS.items():
        args = types.SimpleNamespace(config=learning_study.FULL, eval_every=500,
                                     set=learning_study.FULL_STUDIED + sets)
        cfg = load_config(bench_learning.prepare_run(args, str(tmp_path / name)))
        with torch.device("meta"):
            OSRT(cfg.model)
        configs[name] = cfg.to_dict()
    for name, cfg in configs.items():
        if name not in learning_study.FULL_STARTS:
            assert (cfg != configs["full"]) == (name != "full"), name
    for name, (first, steps) in learning_study.FULL_STARTS.items():
        assert first in configs and steps > 0
        assert configs[first]["model"] == configs[name]["model"] == configs["full"]["model"]
    assert learning_study.main(["--family", "full", "--list"]) == 0
    assert learning_study.main(["--family", "full", "--only", "recipe"]) == 2


def test_bench_init_signal_measures_the_stem(tiny_run):
    """The reference's conv init leaves the stem's tokens nearly alike; He init does not."""
    from benchmarks.learning import bench_init_signal
    config, _ = tiny_run
    default = bench_init_signal.main(["--config", config, "--scenes", "2", "--seeds", "1", "--no-save"])
    he = bench_init_signal.main(["--config", config, "--scenes", "2", "--seeds", "1", "--no-save",
                                 "--set", "encoder_kwargs.conv_init=he"])
    assert set(default) == {"token_spread", "image_share", "slot_scene_share", "slot_similarity",
                            "top_slot_share"}
    assert he["token_spread"] > 10 * default["token_spread"]
    assert 0 < default["image_share"] and 0 < he["image_share"]


def test_study_table_reads_the_curves(tmp_path, monkeypatch, capsys):
    import json
    from benchmarks.learning import learning_study
    monkeypatch.setattr(learning_study, "RESULTS", str(tmp_path))
    (tmp_path / "no_plucker").mkdir()
    (tmp_path / "no_plucker" / "curves.json").write_text(json.dumps({
        "mean_image_psnr": 19.0, "points": [
            {"it": 250, "psnr": 19.5, "fg_ari": 0.1, "slot_max_share": 0.3},
            {"it": 500, "psnr": 19.25, "fg_ari": 0.4, "slot_max_share": 0.5, "train_s": 90.0}]}))
    assert learning_study.main(["--table", "--only", "no_plucker", "no_slot_balance"]) == 0
    rows = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| [")]
    assert rows == ["| [`no_plucker`](../benchmarks/results/learning/no_plucker/curves.png) | camera position "
                    "and direction (the reference's rays) instead of Pluecker | 500 | 1.5 | 19.50 / 19.25 "
                    "(19.00) | 0.40 / 0.40 | 0.50 |"]


def test_grow_slots_keeps_every_trained_weight_and_adds_spare_slots(tmp_path):
    """benchmarks.learning.grow_slots: a checkpoint of K slots -> K + 2, every other weight and
    the optimiser's state kept, the new slots near their sources, and the grown file loads into
    (and runs) the model of K + 2 slots with its optimiser."""
    import torch

    from benchmarks.learning.grow_slots import KEY, grow
    from osrt_fast import OSRT
    from osrt_fast.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
    from tests.conftest import scene_inputs, tiny_model_config

    torch.manual_seed(0)
    model = OSRT(tiny_model_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, cam, rays, tcam, trays, target = scene_inputs(rays=11)
    pixels, _ = model(images, cam, rays, tcam, trays)
    (pixels - target).square().mean().backward()
    optimizer.step()
    old_path, new_path = str(tmp_path / "k3.pt"), str(tmp_path / "k5.pt")
    save_checkpoint(old_path, model, optimizer, it=7)
    grow(old_path, 5, new_path, noise=0.1)

    old, new = read_checkpoint(old_path), read_checkpoint(new_path)
    assert new["it"] == 7 and new["osrt_fast"]["model_config"]["encoder_kwargs"]["num_slots"] == 5
    slots = new["encoder"][KEY]
    assert slots.shape == (5, 32) and torch.equal(slots[:3], old["encoder"][KEY])
    assert not torch.equal(slots[3:], old["encoder"][KEY][:2])                 # noise added
    assert (slots[3:] - old["encoder"][KEY][:2]).abs().max() < 1.0             # near the sources
    for part in ("encoder", "decoder"):
        for k, v in old[part].items():
            if k != KEY:
                assert torch.equal(new[part][k], v), k
    grown = OSRT(tiny_model_config(encoder_kwargs={**tiny_model_config()["encoder_kwargs"], "num_slots": 5}))
    grown_opt = torch.optim.Adam(grown.parameters(), lr=1e-3)
    load_checkpoint(new_path, grown, grown_opt)
    index = [n for n, _ in grown.named_parameters()].index("encoder." + KEY)
    moments = grown_opt.state_dict()["state"][index]["exp_avg_sq"]
    assert moments.shape == (5, 32) and torch.equal(moments[3:], moments[:2])
    pixels, extras = grown(images, cam, rays, tcam, trays)
    assert extras["segmentation"].shape[-1] == 5 and torch.isfinite(pixels).all()
    with pytest.raises(SystemExit, match="give more"):
        grow(old_path, 3, str(tmp_path / "same.pt"))


def test_segmentation_errors_count_edges_background_slot_and_merges():
    """bench_segmentation_errors' measures on hand-made scenes whose answers are known."""
    import torch

    from benchmarks.learning.bench_segmentation_errors import edge_pixels, scene_errors
    labels = torch.zeros(4, 4, dtype=torch.long)
    labels[1:3, 1:3] = 1                                        # a 2x2 object in a 4x4 view
    edge = edge_pixels(labels)
    assert edge[1:3, 1:3].all() and edge.sum() == 4 + 8        # its 4 pixels and 8 neighbours
    assert not edge[0, 0] and not edge[3, 3]
    one_hot = lambda idx, n: torch.nn.functional.one_hot(torch.tensor(idx), n).float()[None]  # noqa: E731
    # 8 pixels: background x2, object 1 x3, object 2 x3
    masks = one_hot([0, 0, 1, 1, 1, 2, 2, 2], 3)
    apart = one_hot([0, 0, 1, 1, 0, 2, 2, 2], 3)               # one pixel of object 1 in the background's slot
    merged = one_hot([0, 0, 1, 1, 1, 1, 1, 2], 3)              # both objects mostly in slot 1
    a, = scene_errors(masks, apart)
    assert a["objects"] == 2 and not a["merged"]
    assert a["in_background_slot"] == pytest.approx(1 / 6) and a["least_purity"] == pytest.approx(2 / 3)
    m, = scene_errors(masks, merged)
    assert m["merged"] and m["in_background_slot"] == 0 and m["least_purity"] == pytest.approx(2 / 3)


def test_bench_segmentation_errors_measures_a_checkpoint(tiny_run):
    from benchmarks.learning import bench_segmentation_errors
    config, _ = tiny_run
    checkpoint = os.path.join(os.path.dirname(config), "model.pt")
    row = bench_segmentation_errors.main(["--config", config, "--checkpoint", checkpoint,
                                          "--split", "val", "--max-eval", "3", "--no-save"])
    assert row["items"] == 3 and row["it"] == 2
    assert -1 <= row["fg_ari_without_edges"] <= 1 and 0 < row["edge_share_of_object_pixels"] <= 1
    assert sum(v["scenes"] for v in row["by_objects"].values()) == 3
