"""Prepares what the GPU machine needs for the suite that is not in the repository, in .gpu/
(git-ignored; carried to the machine with the working tree). See docs/GPU.md.

    python -m benchmarks.gpu.prepare_gpu --reference PATH [--wheel NAME==VERSION ...] [--no-wheels]

.gpu/reference/   the reference's `osrt` package and licence, copied from a checkout of
                  stelzner/osrt at PATH (for the suite's "vs reference" row; never committed)
.gpu/wheels/      wheels for Python 3.12 on x86-64 Linux that the machine lacks (default:
                  imageio-ffmpeg, for render.py's videos), fetched with pip download
.gpu/COMMIT       the commit being measured (no .git travels to the machine)

It refuses to leave more than the device tool carries (64 MiB with the working tree) and prints
the command to run there.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from benchmarks.common import ROOT, git_commit

GPU_DIR = os.path.join(ROOT, ".gpu")
LIMIT_BYTES = 64 * 2 ** 20
# imageio-ffmpeg 0.6.0's wheel is 28 MiB; 0.8.x's is 65 MiB, more than the device tool carries.
DEFAULT_WHEELS = ("imageio-ffmpeg==0.6.0",)
# pip matches a manylinux tag exactly; these cover the wheels of the packages above.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux2010_x86_64", "manylinux1_x86_64")

# The one command to run on the GPU machine (device tool: carry [".gpu"]). docs/GPU.md quotes it
# and tests/test_suite.py checks that the two agree and that it fits the tool's 2000 characters.
DEVICE_COMMAND = (
    "export PYTHONUNBUFFERED=1; set -o pipefail; "
    "if ls .gpu/wheels/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps "
    "--no-compile --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site; fi; "
    "nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv; "
    "python3 -m benchmarks.gpu.suite --reference .gpu/reference --results-dir $OUT --budget-s 450 "
    "2>&1 | tee $OUT/suite.log")


def tree_bytes() -> int:
    """Bytes of what travels besides .gpu/: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout
    total = 0
    for name in out.decode().split("\0"):
        path = os.path.join(ROOT, name)
        if name and os.path.isfile(path):
            total += os.path.getsize(path)
    return total


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def copy_reference(src: str, dest: str) -> None:
    package = os.path.join(src, "osrt")
    if not os.path.isfile(os.path.join(package, "model.py")):
        sys.exit(f"error: {src} is not a checkout of stelzner/osrt (no osrt/model.py there)")
    if os.path.exists(dest):
        shutil.rmtree(dest)
    shutil.copytree(package, os.path.join(dest, "osrt"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("LICENSE", "README.md"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dest)


def download_wheels(specs, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", dest]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    proc = subprocess.run(cmd + list(specs), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: pip download {' '.join(specs)} failed:\n{proc.stderr[-2000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.prepare_gpu",
                                description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="a checkout of stelzner/osrt")
    p.add_argument("--wheel", action="append", help=f"a wheel to carry (default {DEFAULT_WHEELS})")
    p.add_argument("--no-wheels", action="store_true", help="carry no wheels")
    args = p.parse_args(argv)
    os.makedirs(GPU_DIR, exist_ok=True)
    copy_reference(args.reference, os.path.join(GPU_DIR, "reference"))
    wheels = os.path.join(GPU_DIR, "wheels")
    if os.path.exists(wheels):
        shutil.rmtree(wheels)
    if not args.no_wheels:
        download_wheels(args.wheel or DEFAULT_WHEELS, wheels)
    with open(os.path.join(GPU_DIR, "COMMIT"), "w") as f:
        f.write(git_commit() + "\n")
    gpu, tree = folder_bytes(GPU_DIR), tree_bytes()
    print(f".gpu/ holds {gpu / 2 ** 20:.1f} MiB; the working tree {tree / 2 ** 20:.1f} MiB; "
          f"together {(gpu + tree) / 2 ** 20:.1f} MiB of the 64 MiB the device tool carries")
    if gpu + tree > LIMIT_BYTES:
        sys.exit("error: too large to carry; drop wheels (--no-wheels) or untracked files")
    print(f"\nOn the GPU machine (device tool: carry [\".gpu\"], timeout_s 570), run:\n\n{DEVICE_COMMAND}\n"
          f"\nThen here: python -m benchmarks.gpu.suite_report --import <the folder its files came "
          f"back to>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
