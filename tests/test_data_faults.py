"""Fault injection (issue 14): damaged, missing, wrong-size and out-of-range data is replaced
deterministically with a counted warning instead of crashing a run; `python -m
osrt_fast.data.check` lists every problem; PNG chunk CRCs are verified; damaged metadata gives
a DataError naming the fix; the generator checks its arguments before writing, and holds a
folder lock with unique temporary files."""
import io
import os
import re
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image

from osrt_fast import data, scenes
from osrt_fast.config import DataConfig
from osrt_fast.data import CorruptFile, DataError, DataWarning, ObSuRFDataset, check, nmr, shards
from osrt_fast.data.png import decode_png

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = dict(num_scenes=8, height=16, width=16, num_views=2, min_objects=1, max_objects=3, seed=0)
TRAIN_SCENES = 6            # procedural split of 8 scenes: 6 / 1 / 1


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faults") / "procedural")
    scenes.generate_dataset(root, progress=False, **GEN)
    return root


def copy_of(proc, tmp_path, name="copy"):
    return shutil.copytree(proc, str(tmp_path / name))


def obsurf(root):
    return ObSuRFDataset(root, "train", kind="procedural", max_objects=3)


# ----------------------------------------------------------------------------------------------
# PNG helpers


def png_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def idat_range(png: bytes) -> tuple:
    """[start, end) of the first IDAT chunk's data."""
    at = png.index(b"IDAT")
    return at + 4, at + 4 + int.from_bytes(png[at - 4:at], "big")


def flipped(png: bytes, byte: int, bit: int) -> bytes:
    out = bytearray(png)
    out[byte] ^= 1 << bit
    return bytes(out)


def pillow_accepts(png: bytes) -> bool:
    """The old decoding path: Pillow alone."""
    try:
        with Image.open(io.BytesIO(png)) as im:
            np.asarray(im)
        return True
    except Exception:
        return False


def undetected_flip(png: bytes) -> bytes:
    """A single-bit flip in the image data that Pillow decodes without error."""
    start, end = idat_range(png)
    for byte in range(start, end):
        for bit in range(8):
            bad = flipped(png, byte, bit)
            if pillow_accepts(bad):
                return bad
    raise AssertionError("Pillow rejected every flip of this PNG")


def flip_file(path: str) -> None:
    with open(path, "rb") as f:
        png = f.read()
    with open(path, "wb") as f:
        f.write(undetected_flip(png))


# ----------------------------------------------------------------------------------------------
# 3. Verified PNG decoding


def test_every_single_bit_flip_in_image_data_is_detected():
    img = (np.arange(16 * 16 * 3).reshape(16, 16, 3) % 251).astype(np.uint8)
    png = png_bytes(img)
    np.testing.assert_array_equal(decode_png(png, "good.png"), img)
    start, end = idat_range(png)
    flips = [flipped(png, byte, bit) for byte in range(start, end) for bit in range(8)]
    # Why: Pillow checks neither chunk CRCs nor zlib's Adler-32, so some flips decode silently.
    assert sum(pillow_accepts(bad) for bad in flips) >= 1
    for bad in flips:
        with pytest.raises(CorruptFile, match="flip.png: chunk 1 \\('IDAT'.*CRC"):
            decode_png(bad, "flip.png")


def test_damaged_png_structure_is_named():
    png = png_bytes(np.zeros((8, 8), np.uint8))
    with pytest.raises(CorruptFile, match="x.png: not a PNG file"):
        decode_png(b"GIF89a" + png[6:], "x.png")
    with pytest.raises(CorruptFile, match="x.png: .*(truncated|past the end)"):
        decode_png(png[:-12], "x.png")                    # IEND cut off
    with pytest.raises(CorruptFile, match="'IHDR'.*CRC"):
        decode_png(flipped(png, 20, 0), "x.png")          # a flip in the header
    # A chunk with a valid CRC but broken zlib data still fails (in Pillow), as CorruptFile.
    start, end = idat_range(png)
    garbage = b"\x00" * (end - start)
    crc = zlib.crc32(b"IDAT" + garbage).to_bytes(4, "big")
    with pytest.raises(CorruptFile, match="x.png"):
        decode_png(png[:start] + garbage + crc + png[end + 4:], "x.png")


# ----------------------------------------------------------------------------------------------
# 1. Robust items: ObSuRF layout


def damage_missing(root):
    os.remove(os.path.join(root, "images", "img_1_1.png"))
    return r"img_1_1\.png': file is missing"


def damage_wrong_size(root):
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(
        os.path.join(root, "images", "img_1_0.png"))
    return r"img_1_0\.png' is 24x16 .* images are 16x16"


def damage_mask_id(root):
    path = os.path.join(root, "masks", "masks_1_1.png")
    mask = np.asarray(Image.open(path)).copy()
    mask[3, 5] = 200
    Image.fromarray(mask).save(path)
    return r"masks_1_1\.png' has instance id 200, but .* only 4 slots"


def damage_bit_flip(root):
    flip_file(os.path.join(root, "images", "img_1_1.png"))
    return r"img_1_1\.png': chunk 1 \('IDAT'.*CRC"


@pytest.mark.parametrize("damage", [damage_missing, damage_wrong_size, damage_mask_id,
                                    damage_bit_flip])
def test_damaged_scene_is_replaced_by_the_next_one(proc, tmp_path, damage):
    root = copy_of(proc, tmp_path)
    reason = damage(root)
    clean, ds = obsurf(proc), obsurf(root)
    n = TRAIN_SCENES
    for idx in (1, 1 + n):                  # scene 1 from view 0 and view 1
        with pytest.warns(DataWarning, match=reason):
            rec = ds[(idx, 7)]
        want = clean[(idx + 1, 7)]          # scene 2, seen as item idx is
        for k in ("images", "ids", "origins", "ray_mats"):
            np.testing.assert_array_equal(rec[k], want[k], err_msg=k)
        assert rec["sceneid"] == idx and rec["input_views"].tolist() == [idx // n]
    assert ds.skipped.count == 2
    # Deterministic: a fresh dataset (a resumed run, another worker) gives the same item.
    with pytest.warns(DataWarning):
        again = obsurf(root)[(1, 7)]
    np.testing.assert_array_equal(again["images"], clean[(2, 7)]["images"])
    ds[(0, 7)]                              # undamaged scenes load without warnings


def test_too_many_damaged_scenes_in_a_row_is_a_data_error(proc, tmp_path):
    root = copy_of(proc, tmp_path)
    ds = obsurf(root)
    shutil.rmtree(os.path.join(root, "masks"))
    with pytest.warns(DataWarning):
        with pytest.raises(DataError, match="17 scenes in a row .* could not be read.*Delete the "
                                            "folder.*last: .*masks_.*file is missing.*"
                                            "python -m osrt_fast.data.check"):
            ds[(0, 0)]


# ----------------------------------------------------------------------------------------------
# 1. Robust items: NMR and shards


def test_nmr_missing_and_bit_flipped_images_are_replaced(tmp_path):
    root = nmr.write_fixture(str(tmp_path / "nmr"), ("02691156",), size=16,
                             objects_per_split={"train": 3, "val": 0, "test": 0})
    ds = nmr.NMRDataset(root, "train")
    want = ds[(2, 0)]["images"]
    flip_file(os.path.join(root, ds.scene_paths[1], "image", "0004.png"))
    with pytest.warns(DataWarning, match=r"0004\.png': chunk 1 \('IDAT'.*CRC"):
        np.testing.assert_array_equal(ds[(1, 0)]["images"], want)
    os.remove(os.path.join(root, ds.scene_paths[1], "image", "0007.png"))
    with pytest.warns(DataWarning, match=r"image[/\\]0007\.png missing"):
        np.testing.assert_array_equal(ds[(1, 0)]["images"], want)


@pytest.fixture()
def converted(proc, tmp_path):
    """(source dataset, function: encoding -> ShardDataset of its train split, 2 per shard)."""
    src = obsurf(proc)

    def convert(encoding):
        out = str(tmp_path / encoding)
        shards.convert(src, os.path.join(out, "train"), encoding, shard_size=2, progress=False)
        return shards.ShardDataset(out, "train")
    return src, convert


def test_png_shard_with_an_undetected_bit_flip_is_replaced(converted):
    src, convert = converted
    ds = convert("png")
    base = os.path.join(ds.folder, "shard_00000.images")
    offsets = np.load(base + ".offsets.npy")
    blob = open(base + ".bin", "rb").read()
    a, b = int(offsets[2]), int(offsets[3])          # scene 1, view 0
    open(base + ".bin", "wb").write(blob[:a] + undetected_flip(blob[a:b]) + blob[b:])
    with pytest.warns(DataWarning, match=r"shard_00000\.images\.bin' scene 1 view 0: .*CRC"):
        rec = ds[(1, 0)]
    np.testing.assert_array_equal(rec["images"], src[(2, 0)]["images"])


def test_raw_shard_truncated_file_skips_to_the_next_shard(converted):
    src, convert = converted
    ds = convert("raw")
    path = os.path.join(ds.folder, "shard_00001.images.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    for idx in (2, 3):                             # both scenes of shard 1 -> scene 4
        with pytest.warns(DataWarning, match=r"shard_00001' is unreadable"):
            rec = ds[(idx, 0)]
        np.testing.assert_array_equal(rec["images"], src[(4, 0)]["images"])
    assert ds.skipped.count == 2


def test_raw_shard_ids_out_of_range_are_replaced(converted):
    src, convert = converted
    ds = convert("raw")
    path = os.path.join(ds.folder, "shard_00000.ids.npy")
    ids = np.load(path)
    ids[0, 1, 2, 3] = 200
    np.save(path, ids)
    with pytest.warns(DataWarning, match="instance id 200 is beyond the 4 slots"):
        rec = ds[(0, 0)]
    np.testing.assert_array_equal(rec["ids"], src[(1, 0)]["ids"])


# ----------------------------------------------------------------------------------------------
# 2. python -m osrt_fast.data.check


def write_config(tmp_path, root) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "procedural", "path": root,
                                             "kwargs": dict(GEN)}}))
    return str(path)


def test_check_lists_every_problem(proc, tmp_path, capsys):
    root = copy_of(proc, tmp_path)
    cfg = write_config(tmp_path, root)
    assert check.main([cfg]) == 0
    assert "all 8 scenes of train, val, test read without problems" in capsys.readouterr().out

    damage_missing(root)                         # train scene 1
    damage_mask_id(root)                         # train scene 1 too: the first problem is named
    flip_file(os.path.join(root, "images", "img_4_0.png"))      # train scene 4
    flip_file(os.path.join(root, "masks", "masks_6_1.png"))     # val scene 6
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
        os.path.join(root, "images", "img_7_1.png"))            # test scene 7
    assert check.main([cfg, "--split", "all"]) == 1
    out = capsys.readouterr().out
    for line in (r"train: '.*img_1_1\.png': file is missing",
                 r"train: '.*img_4_0\.png': chunk 1 \('IDAT'.*CRC",
                 r"val: '.*masks_6_1\.png': chunk 1 \('IDAT'.*CRC",
                 r"test: '.*img_7_1\.png' is 8x8"):
        assert any(re.search(line, x) for x in out.splitlines()), (line, out)
    assert "4 problem(s) found" in out
    assert check.main([cfg, "--split", "train", "--max-scenes", "1"]) == 0
    assert check.main([cfg, "--split", "val"]) == 1
    capsys.readouterr()

    os.remove(os.path.join(root, "metadata.npz"))              # not generated: not generated
    assert check.main([cfg, "--split", "test"]) == 1
    out = capsys.readouterr().out
    assert "no generated procedural data" in out and "could not be opened" in out
    assert "Damaged" not in out                                 # nothing was damaged
    assert not os.path.exists(os.path.join(root, "metadata.npz"))


def test_check_names_a_missing_data_folder_and_how_to_make_it(tmp_path, capsys):
    cfg = write_config(tmp_path, str(tmp_path / "nowhere"))
    assert check.main([cfg]) == 1
    captured = capsys.readouterr()
    assert f"the data folder '{tmp_path / 'nowhere'}' does not exist" in captured.err
    assert "python train.py" in captured.err and "python -m osrt_fast.scenes --out" in captured.err
    assert "Damaged" not in captured.out + captured.err and not (tmp_path / "nowhere").exists()


def test_check_config_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {dataset: nosuch}\n")
    for args in ([str(tmp_path / "missing.yaml")], [str(bad)]):
        r = subprocess.run([sys.executable, "-m", "osrt_fast.data.check", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        assert "error:" in r.stderr


# ----------------------------------------------------------------------------------------------
# 4. Damaged metadata.npz and generator.json


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def random_bytes(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(500))


def drop_key(path):
    meta = dict(np.load(path))
    del meta["shape"]
    np.savez(path, **meta)


def wrong_shape(path):
    meta = dict(np.load(path))
    meta["camera_pos"] = meta["camera_pos"][:, :, :2]
    np.savez(path, **meta)


@pytest.mark.parametrize("damage", [truncate, random_bytes, drop_key, wrong_shape])
def test_damaged_metadata_is_a_data_error_naming_the_fix(proc, tmp_path, damage):
    root = copy_of(proc, tmp_path)
    damage(os.path.join(root, "metadata.npz"))
    with pytest.raises(DataError) as e:
        obsurf(root)
    msg = str(e.value)
    assert "metadata.npz' is damaged" in msg and f"Delete the folder '{root}'" in msg
    assert "allow_pickle" not in msg
    with pytest.raises(DataError, match="Re-download the clevr3d dataset"):
        ObSuRFDataset(root, "train", kind="clevr3d")


@pytest.mark.parametrize("content", [b'{"num_scenes": 8, "hei', bytes(range(200, 256)),
                                     b"[1, 2]", b'{"num_scenes": 8}'],
                         ids=["truncated", "random-bytes", "not-a-dict", "missing-keys"])
def test_damaged_generator_json_is_a_data_error_naming_the_fix(proc, tmp_path, content):
    root = copy_of(proc, tmp_path)
    with open(os.path.join(root, scenes.SETTINGS_FILE), "wb") as f:
        f.write(content)
    cfg = DataConfig(dataset="procedural", path=root, kwargs=dict(GEN))
    match = f"generator.json' is damaged .*Delete the folder '{root}'"
    with pytest.raises(DataError, match=match):
        data.get_dataset("train", cfg)                   # complete data: checks the settings
    os.remove(os.path.join(root, "metadata.npz"))
    with pytest.raises(DataError, match=match):
        data.get_dataset("train", cfg)                   # incomplete: the generator resumes


# ----------------------------------------------------------------------------------------------
# 5. Generator arguments are checked before anything is written


TINY = ["--num-scenes", "2", "--height", "8", "--width", "8", "--num-views", "1"]


@pytest.mark.parametrize("args,reason", [
    (["--min-objects", "5", "--max-objects", "2"], r"min_objects \(5\) must not exceed max_"),
    (["--num-scenes", "0"], "num_scenes must be at least 1, got 0"),
    (["--height", "0", "--width", "-3"], "height must be at least 1.*width must be at least 1"),
    (["--num-views", "0"], "num_views must be at least 1"),
    (["--min-objects", "0"], "min_objects must be at least 1"),
    (["--max-objects", "300"], "max_objects must be at most 255"),
    (["--seed", "-1"], "seed must be 0 or more"),
    (["--device", "nonsense"], "device 'nonsense' is not a device name"),
])
def test_generator_checks_arguments_before_writing(tmp_path, capsys, args, reason):
    out = str(tmp_path / "gen")
    assert scenes.main(["--out", out] + TINY + args) == 2
    err = capsys.readouterr().err
    assert re.search(reason, err), err
    assert "Nothing was written" in err and not os.path.exists(out)
    # The corrected run is not refused.
    assert scenes.main(["--out", out] + TINY + ["--min-objects", "1", "--max-objects", "2"]) == 0
    assert os.path.isfile(os.path.join(out, "metadata.npz"))


# ----------------------------------------------------------------------------------------------
# 6. One generator per folder; unique temporary files; stale ones removed


PAUSED_GENERATOR = """
import sys
from osrt_fast import scenes
render = scenes._render_scenes
def paused(*args, **kwargs):
    print("rendering", flush=True)
    sys.stdin.readline()                      # wait for the test
    render(*args, **kwargs)
scenes._render_scenes = paused
sys.exit(scenes.main(sys.argv[1:]))
"""


def generator_cli(out, *extra):
    return [sys.executable, "-m", "osrt_fast.scenes", "--out", out, *TINY, *extra]


def test_second_generator_on_a_folder_is_refused_naming_the_first(tmp_path):
    out = str(tmp_path / "gen")
    first = subprocess.Popen([sys.executable, "-c", PAUSED_GENERATOR, "--out", out, *TINY],
                             cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "rendering", first.stderr.read()
        second = subprocess.run(generator_cli(out), cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stderr
        assert "in use by another process" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        # The trainer's first-use generation is refused the same way, as a DataError.
        cfg = DataConfig(dataset="procedural", path=out,
                         kwargs=dict(num_scenes=2, height=8, width=8, num_views=1))
        with pytest.raises(DataError, match=f"in use by another process \\(pid {first.pid}"):
            data.get_dataset("train", cfg)
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    again = subprocess.run(generator_cli(out), cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert os.path.isfile(os.path.join(out, "metadata.npz"))


def test_temporary_names_are_unique_and_stale_ones_are_removed(tmp_path):
    target = str(tmp_path / "file.bin")

    def outer(f):
        # A second writer of the same file while the first is writing: each has its own
        # temporary file (a fixed name would be clobbered and the first rename would fail).
        scenes._write_atomic(target, lambda g: g.write(b"inner"))
        temps = [x for x in os.listdir(tmp_path) if x.startswith(scenes.TMP_PREFIX)]
        assert len(temps) == 1
        f.write(b"outer")
    scenes._write_atomic(target, outer)
    assert open(target, "rb").read() == b"outer"
    assert os.listdir(tmp_path) == ["file.bin"]
    plain = str(tmp_path / "plain")
    open(plain, "w").close()             # not mkstemp's private 0600: as any new file
    assert os.stat(target).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
    os.remove(plain)

    out = str(tmp_path / "gen")
    os.makedirs(os.path.join(out, "images"))
    stale = [os.path.join(out, "images", scenes.TMP_PREFIX + "img_0_0.png.k3x9q2"),
             os.path.join(out, "metadata.tmp.npz")]
    for path in stale:
        open(path, "wb").close()
    scenes.generate_dataset(out, 2, height=8, width=8, num_views=1, progress=False)
    assert not any(os.path.exists(p) for p in stale)
    for folder, _, files in os.walk(out):
        assert not [x for x in files if "tmp" in x], folder
