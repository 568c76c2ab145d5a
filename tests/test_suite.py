"""The GPU suite (benchmarks/gpu/suite.py) end to end at tiny shapes on the CPU (--smoke), its
report and the README table generated from its results, and the documented device command.
No speed is asserted: these check the suite, not the GPU."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks.gpu import suite_report
from osrt_fast.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STANDIN = os.path.join(ROOT, "tests", "fixtures", "reference_standin")
ENV_FIELDS = ("device", "commit", "date", "torch", "triton", "suite_run", "section")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(rows of the run, its results folder, stdout) of `python -m benchmarks.gpu.suite --smoke`."""
    tmp = tmp_path_factory.mktemp("suite")
    results = tmp / "results"
    env = dict(os.environ, TMPDIR=str(tmp), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu.suite", "--smoke", "--reference",
                           STANDIN, "--results-dir", str(results)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [jsonl] = results.glob("suite_*.jsonl")
    return suite_report.load_rows(str(jsonl)), results, proc.stdout


def rows_of(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def measured(row):
    return not (row.get("skipped") or row.get("error") or row.get("oom"))


@pytest.mark.slow
def test_smoke_runs_every_section_without_error(smoke):
    rows, _, _ = smoke
    errors = [r for r in rows if r.get("error")]
    assert not errors, json.dumps(errors, indent=1)[:4000]
    sections = {r["name"] for r in rows_of(rows, bench="section") if r.get("seconds") is not None}
    assert sections == {"correctness", "train_step", "reference", "kernels", "data", "viewer"}
    assert len({r["suite_run"] for r in rows}) == 1
    for r in rows:
        assert all(r.get(k) is not None for k in ENV_FIELDS if k != "triton"), r
        assert r["smoke"] is True


@pytest.mark.slow
def test_correctness_section_runs_the_device_tests(smoke):
    rows, _, _ = smoke
    [row] = rows_of(rows, bench="correctness")
    assert row["failed"] == 0 and row["errors"] == 0 and row["returncode"] == 0, row
    # A kernel test's CPU case and two of tests/test_gpu.py on the CPU (OSRT_TEST_DEVICE=cpu).
    assert row["passed"] == 3 and row["skipped"] == 0, row


@pytest.mark.slow
def test_train_step_section_covers_every_path_and_the_paper_batch(smoke):
    rows, _, _ = smoke
    for path in ("eager-fp32", "eager-bf16", "fast", "fast-ckpt"):
        [row] = rows_of(rows, bench="train_step", path=path)
        assert measured(row) and row["scenes"] == 2 and row["scenes_per_s"] > 0, row
        assert row["tflops_per_s"] > 0 and row["mfu"] is None, row      # no peak for a CPU
    assert rows_of(rows, bench="train_step", path="eager-fp32")[0]["speedup_vs_eager_fp32"] == 1.0
    [paper] = rows_of(rows, bench="train_step_paper_batch")
    assert measured(paper) and paper["path"] == "fast-ckpt" and paper["scenes"] == 4


@pytest.mark.slow
def test_reference_section_searches_the_largest_batch(smoke):
    """The stand-in runs out of memory above one scene: the equal-work row says so, and the
    search finds 1."""
    rows, _, _ = smoke
    [equal] = rows_of(rows, bench="train_step", path="reference")
    assert equal["oom"] and equal["scenes"] == 2
    [largest] = rows_of(rows, bench="train_step_largest", path="reference")
    assert largest["largest_scenes"] == 1 and largest["scenes_per_s"] > 0


@pytest.mark.slow
def test_kernels_section_has_triton_eager_and_compile_rows(smoke):
    rows, _, _ = smoke
    for dtype in ("fp32", "bf16"):
        for bench, name, mode in (("op", "slot_attention_step", "fwdbwd"), ("block", "decoder", "fwdbwd"),
                                  ("render", "frame", "fwd")):
            for path in ("triton", "eager"):
                [row] = rows_of(rows, bench=bench, name=name, path=path, dtype=dtype, mode=mode)
                assert measured(row) and row["median_ms"] > 0 and row.get("speedup"), row
        for bench, name in (("op", "slot_attention_step"), ("block", "decoder")):
            [row] = rows_of(rows, bench=bench, name=name, path="compile", dtype=dtype, mode="fwdbwd")
            assert row["skipped"], row            # no torch.compile in the smoke run


@pytest.mark.slow
def test_data_section_times_make_batch_and_the_loaders(smoke):
    rows, _, _ = smoke
    [mb] = rows_of(rows, bench="make_batch")
    assert mb["scenes"] == 4 and mb["scenes_per_s"] > 0
    loaders = rows_of(rows, bench="loader")
    assert {(r["path"], r["workers"]) for r in loaders} == {
        ("shards_raw", 0), ("shards_raw", 1), ("shards_png", 0), ("shards_png", 1)}
    assert all(measured(r) and r["scenes_per_s"] > 0 for r in loaders)


@pytest.mark.slow
def test_summary_and_profile_are_written(smoke):
    rows, results, stdout = smoke
    [summary] = results.glob("suite_*.md")
    text = summary.read_text()
    assert "smoke run" in text and "| figure | measured | target | met |" in text
    assert "fast step vs eager fp32" in text and "### Kernels" in text
    [profile] = results.glob("suite_*_profile.txt")
    assert "fast path" in profile.read_text() and "Self CPU" in profile.read_text()
    assert "| figure |" in stdout


@pytest.mark.slow
def test_import_and_readme_table_from_a_gpu_run(smoke, tmp_path):
    """A run's files imported once (a second import adds nothing; smoke rows never), and the
    README block generated from them with the run's conditions and figures."""
    rows, _, _ = smoke
    src = tmp_path / "out"
    src.mkdir()
    gpu_rows = [dict(r, smoke=False, device="NVIDIA H100 80GB HBM3") for r in rows]
    with open(src / "suite_nvidia-h100-80gb-hbm3.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in gpu_rows + [dict(rows[0], suite_run="smoke-run")])
    (src / "suite_nvidia-h100-80gb-hbm3.md").write_text("summary")
    results = tmp_path / "results"
    results.mkdir()
    suite_report.import_run(str(src), str(results))
    suite_report.import_run(str(src), str(results))
    imported = suite_report.load_rows(str(results / "suite_nvidia-h100-80gb-hbm3.jsonl"))
    assert len(imported) == len(gpu_rows) and all(not r["smoke"] for r in imported)
    assert (results / "suite_nvidia-h100-80gb-hbm3.md").read_text() == "summary"
    block = suite_report.readme_block(str(results))
    assert "NVIDIA H100 80GB HBM3" in block and rows[0]["commit"] in block
    assert "| fast step vs eager fp32, scenes/s at 32 x 8192 |" in block
    text = f"intro\n{suite_report.BEGIN}\nold\n{suite_report.END}\noutro\n"
    new = suite_report.update_readme(text, block)
    assert new.startswith("intro\n") and new.endswith("outro\n") and "old" not in new and block in new


def test_headline_targets():
    def step(path, sps, mfu=None):
        return {"suite_run": "r", "bench": "train_step", "path": path, "scenes_per_s": sps, "mfu": mfu}
    rows = [step("eager-fp32", 30.0), step("eager-bf16", 180.0), step("fast", 330.0, 0.55),
            step("fast-ckpt", 300.0, 0.45),
            {"suite_run": "r", "bench": "train_step_largest", "path": "reference", "scenes_per_s": 25.0},
            {"suite_run": "r", "bench": "render", "name": "frame", "path": "triton", "dtype": "bf16",
             "mode": "fwd", "median_ms": 1.5},
            {"suite_run": "r", "bench": "loader", "path": "shards_raw", "scenes_per_s": 700.0},
            {"suite_run": "r", "bench": "correctness", "passed": 40, "failed": 1, "errors": 0, "skipped": 0}]
    met = {h["what"]: h["met"] for h in suite_report.headline(rows)}
    assert met["fast step vs eager fp32, scenes/s at 32 x 8192"] is True        # 11x
    assert met["fast step vs the reference (its largest batch)"] is True         # 13.2x
    assert met["MFU, fast step"] is True and met["MFU, fast step with checkpointing"] is False
    assert met["one 128x128 frame from 32 slots, triton bf16, ms"] is False
    assert met["loader scenes/s over the fast step's"] is True                   # 2.1x
    assert met["decoder fwd+bwd at 32 x 8192, triton vs eager (bf16)"] is None   # not measured
    assert met["correctness tests on the device"] is False


def test_readme_table_is_generated_from_the_committed_results():
    assert suite_report.main(["--check"]) == 0, "run: python -m benchmarks.gpu.suite_report"


def test_device_command_is_documented_and_fits_the_tool():
    from benchmarks.gpu.prepare_gpu import DEVICE_COMMAND
    assert len(DEVICE_COMMAND) <= 2000
    assert DEVICE_COMMAND in open(os.path.join(ROOT, "docs", "GPU.md")).read()


@pytest.mark.slow
def test_viewer_section_measures_both_backends(smoke):
    rows, results, _ = smoke
    viewer = rows_of(rows, bench="viewer")
    assert {r["backend"] for r in viewer} == {"eager", "triton"}
    assert all(r["fps"] > 0 and r["height"] == 16 for r in viewer)
    summary = open(os.path.join(results, "suite_cpu.md")).read()
    slots = load_config(os.path.join(ROOT, "configs", "demo.yaml")).model.encoder_kwargs["num_slots"]
    assert "### Viewer" in summary and f"| demo | {slots} | 16x16 | triton |" in summary
