"""DALI loader for 'png' shards (CPU pipelines only): batches equal the PyTorch path's collated
records for the same (index, seed) pairs, in training (resumable) and evaluation order;
make_batch runs on them; corrupt PNGs are skipped with counted warnings; clear errors."""
import os
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI is not installed: pip install 'osrt-fast[dali]'")

from osrt_fast import scenes  # noqa: E402
from osrt_fast.data import DataError, DataWarning, ObSuRFDataset, collate, make_batch  # noqa: E402
from osrt_fast.data import shards  # noqa: E402
from osrt_fast.data.dali import DaliShardLoader  # noqa: E402
from osrt_fast.data.errors import CorruptFile  # noqa: E402
from osrt_fast.data import BatchSpec, FixedSampler, ResumableBatchSampler  # noqa: E402

V, H, W, P = 3, 16, 16, 16


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("dali")
    root = str(base / "procedural")
    scenes.generate_dataset(root, 8, height=H, width=W, num_views=V, progress=False)
    src = ObSuRFDataset(root, "train", kind="procedural")
    shards.convert(src, str(base / "png" / "train"), "png", shard_size=3, progress=False)
    shards.convert(src, str(base / "raw" / "train"), "raw", shard_size=3, progress=False)
    return base


def png(converted, **kw):
    return shards.ShardDataset(str(converted / "png"), "train", **kw)


def assert_same(batch, ref):
    assert list(batch) == list(ref)
    for k in ref:
        assert batch[k].dtype == ref[k].dtype, k
        assert batch[k].shape == ref[k].shape, k
        assert torch.equal(batch[k], ref[k]), k


def assert_same_model_batch(batch, ref, spec):
    got, want = make_batch(batch, spec), make_batch(ref, spec)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_train_batches_equal_the_pytorch_records_and_make_batch_runs(converted):
    ds = png(converted)
    assert len(ds) == 18 and ds.num_entities > 0
    sampler = ResumableBatchSampler(len(ds), 4, seed=5)
    loader = DaliShardLoader(ds, 4, device="cpu", num_threads=2, seed=5)
    assert len(loader) == sys.maxsize
    n = 0
    for it, batch in zip(range(6), loader):    # crosses an epoch (4 batches of 4 per epoch)
        ref = collate([ds[pair] for pair in sampler.batch(it)])
        assert_same(batch, ref)
        assert batch["images"].shape == (4, V, H, W, 3) and batch["ids"].shape == (4, V, H, W)
        assert_same_model_batch(batch, ref, BatchSpec.for_dataset(ds, num_points=P))
        n += 1
    assert n == 6 and loader.host_decoded_batches == 0


def test_eval_pass_in_order_with_a_smaller_last_batch(converted):
    ds = png(converted, num_input_views=2)
    loader = DaliShardLoader(ds, 4, device="cpu", num_threads=2, train=False, prefetch=3)
    expect = list(FixedSampler(len(ds), 4))
    for _ in range(2):                         # each iteration is one whole pass
        got = list(loader)
        assert len(got) == len(loader) == len(expect) == 5
        for batch, pairs in zip(got, expect):
            assert_same(batch, collate([ds[p] for p in pairs]))
        assert got[-1]["images"].shape[0] == 2
        assert got[0]["input_views"].shape == (4, 2)
    # A pass shorter than the prefetch depth.
    (only,) = list(DaliShardLoader(ds, 32, device="cpu", num_threads=1, train=False))
    assert_same(only, collate([ds[p] for p in next(iter(FixedSampler(len(ds), 32)))]))


def test_resuming_at_start_it_continues_the_same_stream(converted):
    ds = png(converted)
    whole = [b for _, b in zip(range(5), DaliShardLoader(ds, 3, device="cpu", num_threads=2,
                                                         seed=1))]
    resumed = DaliShardLoader(ds, 3, device="cpu", num_threads=2, seed=1, start_it=3)
    for want, got in zip(whole[3:], resumed):
        assert_same(got, want)


def test_errors_for_raw_shards_missing_dali_and_missing_cuda(converted, monkeypatch):
    raw = shards.ShardDataset(str(converted / "raw"), "train")
    with pytest.raises(DataError, match="need no decoding; use the PyTorch DataLoader"):
        DaliShardLoader(raw, 2, device="cpu")
    with pytest.raises(DataError, match="ShardDataset"):
        DaliShardLoader([1, 2, 3], 2, device="cpu")
    ds = png(converted)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(DataError, match="no CUDA device"):
            DaliShardLoader(ds, 2, device="cuda")
    with pytest.raises(DataError, match="'cuda' and 'cpu'"):
        DaliShardLoader(ds, 2, device="meta")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "nvidia.dali", None)      # as if DALI were not installed
        with pytest.raises(DataError, match=r"pip install 'osrt-fast\[dali\]'.*nvidia-dali-cuda130"
                                            r".*PyTorch DataLoader"):
            DaliShardLoader(ds, 2, device="cpu")


def corrupt_copy(converted, name, damage):
    """A copy of the png shards with damage(bytes, start, end) applied to some PNGs in place:
    images of scene 1 view 2 (shard 0) and ids of scene 4 view 0 (shard 1, scene 1 there)."""
    out = converted / name
    if not out.exists():
        shutil.copytree(converted / "png", out)
        for shard, key, pos in ((0, "images", 1 * V + 2), (1, "ids", 1 * V + 0)):
            base = os.path.join(out, "train", f"shard_{shard:05d}.{key}")
            offsets = np.load(base + ".offsets.npy")
            data = bytearray(open(base + ".bin", "rb").read())
            damage(data, int(offsets[pos]), int(offsets[pos + 1]))
            with open(base + ".bin", "wb") as f:
                f.write(data)
    return shards.ShardDataset(str(out), "train")


def overwrite_middle(data, start, end):
    mid = (start + end) // 2
    data[mid:mid + 8] = b"\xff" * 8


def break_idat_crc(data, start, end):
    blob = bytes(data[start:end])
    at = blob.find(b"IDAT")
    length = int.from_bytes(blob[at - 4:at], "big")
    data[start + at + 4 + length] ^= 0xFF          # first byte of the chunk's CRC


@pytest.mark.parametrize("exec_dynamic", [True, False])
def test_corrupt_png_skips_the_scene_with_a_counted_warning(converted, exec_dynamic):
    ds = corrupt_copy(converted, "corrupt", overwrite_middle)
    ref_ds = corrupt_copy(converted, "corrupt", overwrite_middle)
    for scene in (1, 4):                        # PIL (the PyTorch path) rejects them too
        with pytest.raises(CorruptFile):
            ds.reader.read(scene)
    loader = DaliShardLoader(ds, 2, device="cpu", num_threads=2, train=False)
    loader._exec_dynamic = exec_dynamic          # False: rebuild the pipeline after an error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(loader)
    with pytest.warns(DataWarning):
        ref = [collate([ref_ds[p] for p in pairs]) for pairs in FixedSampler(len(ds), 2)]
    # Items 1, 7, 13 use scene 1 and 4, 10, 16 scene 4 (cyclic views): 6 skips, in 6 batches;
    # the other 3 batches, between failed ones, are DALI's.
    assert ds.skipped.count == ref_ds.skipped.count == 6
    assert loader.host_decoded_batches == 6
    skips = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(skips) == 6 and all("skipping a corrupt shard scene" in str(w.message)
                                   for w in skips)
    assert "6 skipped so far" in str(skips[-1].message)
    assert len(got) == len(ref) == 9
    for batch, want in zip(got, ref):
        assert_same(batch, want)
    assert torch.equal(got[0]["images"][1], got[1]["images"][0])   # scene 1 -> scene 2


def test_png_with_a_broken_checksum_is_skipped_by_both_paths(converted):
    """Pixels intact, the IDAT chunk's CRC broken: DALI rejects the PNG, and so does the host
    (osrt_fast.data.png verifies every chunk's CRC), so the scene is skipped with a counted
    warning and the batches are the PyTorch loader's."""
    ds = corrupt_copy(converted, "bad_crc", break_idat_crc)
    ref = corrupt_copy(converted, "bad_crc", break_idat_crc)
    loader = DaliShardLoader(ds, 9, device="cpu", num_threads=2, train=False)
    with pytest.warns(DataWarning, match="skipping a corrupt"):
        got = list(loader)
    assert ds.skipped.count >= 2 and loader.host_decoded_batches == 2
    with pytest.warns(DataWarning, match="skipping a corrupt"):      # the reference skips them too
        for batch, pairs in zip(got, FixedSampler(len(ds), 9)):
            assert_same(batch, collate([ref[p] for p in pairs]))


def test_training_with_the_dali_loader(converted, tmp_path):
    """train.py with data.loader: dali (CPU decoding here): steps run, evaluation covers the split."""
    from conftest import train_tiny
    from osrt_fast.config import ConfigError, config_from_dict
    out = str(tmp_path / "png")
    shutil.copytree(converted / "png" / "train", os.path.join(out, "train"))
    shutil.copytree(converted / "png" / "train", os.path.join(out, "val"))   # a stand-in split
    log = train_tiny(tmp_path, {"dataset": "shards", "path": out, "num_points": 16,
                                "loader": "dali"}, num_workers=1, validate_every=2)
    assert [r for r in log if r.get("split") == "val"]
    with pytest.raises(ConfigError, match="loader 'dali' reads png shards"):
        config_from_dict({"data": {"dataset": "procedural", "loader": "dali"}})
    with pytest.raises(ConfigError, match="data.loader = .ffcv.: expected one of torch, dali"):
        config_from_dict({"data": {"loader": "ffcv"}})
