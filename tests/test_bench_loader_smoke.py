"""benchmarks/speed/bench_loader.py runs end to end in-process on tiny data (16x16 images, 16
scenes, batches of 4) and writes one well-formed JSON line per (path, workers). No speed is
asserted beyond 'positive': this checks the script, not the loaders."""
import io
import json
import os
from contextlib import redirect_stdout

import pytest

pytestmark = pytest.mark.slow      # left out by the quick run (pytest -m "not slow"); CI runs it
PATHS = ("tfds", "png_folder", "shards_raw", "shards_png", "dali")
WORKERS = (0, 1)
FIELDS = ("bench", "path", "workers", "batch_size", "scenes_per_s", "median_batch_s", "startup_s",
          "make_batch_scenes_per_s", "device", "cpu_count", "torch", "commit", "date")


def has_tfds() -> bool:
    """What the benchmark itself decides (an import, not a search: a package that is there but
    fails to import counts as missing for both)."""
    from benchmarks.speed import bench_loader
    return bench_loader.tf_available()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(rows returned by main, rows read back from the output file, printed stdout)."""
    from benchmarks.speed import bench_loader

    tmp = tmp_path_factory.mktemp("bench_loader")
    out = tmp / "loader.jsonl"
    argv = ["--quick", "--height", "16", "--width", "16", "--points", "64", "--scenes", "16",
            "--batch-size", "4", "--batches", "2", "--warmup", "1", "--make-batch-repeat", "1",
            "--workers", *map(str, WORKERS), "--device", "cpu", "--quiet",
            "--data-dir", str(tmp / "data"), "--out", str(out)]
    buf = io.StringIO()
    with redirect_stdout(buf):
        rows = bench_loader.main(argv)
    with open(out) as f:
        saved = [json.loads(line) for line in f]
    assert saved == json.loads(json.dumps(rows))      # what main returns is what it appended
    sizes = [r for r in rows if r["bench"] == "shard_sizes"]
    assert len(sizes) == 1 and rows[0] is sizes[0]
    assert sizes[0]["scenes"] == 16 and sizes[0]["raw_bytes"] > sizes[0]["png_bytes"] > 0
    loader = [r for r in rows if r["bench"] == "loader"]
    return loader, [r for r in saved if r["bench"] == "loader"], buf.getvalue()


def by_key(rows):
    return {(r["path"], r["workers"]): r for r in rows}


def test_one_row_per_path_and_workers(bench):
    rows, saved, _ = bench
    assert len(rows) == len(PATHS) * len(WORKERS)
    assert set(by_key(rows)) == {(p, w) for p in PATHS for w in WORKERS}
    assert saved == json.loads(json.dumps(rows))      # what main returns is what it appended


def test_fields(bench):
    rows, _, _ = bench
    for r in rows:
        missing = [f for f in FIELDS if f not in r]
        assert not missing, f"{r['path']}/{r['workers']} lacks {missing}"
        assert r["bench"] == "loader" and r["batch_size"] == 4
        assert r["cpu_count"] == os.cpu_count()
        assert r["make_batch_device"] == "cpu"


def measured(r) -> None:
    key = f"{r['path']}/{r['workers']}"
    assert "error" not in r and "skipped" not in r, f"{key}: {r.get('error') or r.get('skipped')}"
    assert r["scenes_per_s"] > 0, key
    assert r["median_batch_s"] > 0 and r["startup_s"] > 0, key
    assert r["make_batch_scenes_per_s"] > 0, key


@pytest.mark.parametrize("path", ("png_folder", "shards_raw", "shards_png"))
def test_torch_paths_measured(bench, path):
    rows = by_key(bench[0])
    for w in WORKERS:
        measured(rows[(path, w)])


def test_tfds_path(bench):
    rows = by_key(bench[0])
    for w in WORKERS:
        r = rows[("tfds", w)]
        if has_tfds():
            measured(r)
        else:
            assert "tensorflow" in r["skipped"]


def test_shards_source(bench):
    rows = by_key(bench[0])
    want = "tfds" if has_tfds() else "png_folder"
    assert rows[("shards_raw", 0)]["source"] == want


def test_dali_measured_or_skipped_with_reason(bench):
    rows = by_key(bench[0])
    for w in WORKERS:
        r = rows[("dali", w)]
        assert "error" not in r, r["error"]
        if r.get("skipped"):
            assert r["scenes_per_s"] is None and len(r["skipped"]) > 10
        else:
            assert r["scenes_per_s"] > 0


def test_table_printed(bench):
    _, _, stdout = bench
    for p in PATHS:
        for w in WORKERS:
            assert any(line.split()[:2] == [p, str(w)] for line in stdout.splitlines()
                       if line.strip()), f"table row {p} {w} missing"
