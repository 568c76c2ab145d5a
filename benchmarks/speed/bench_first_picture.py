"""What a new user waits for: the README's demo command in a fresh clone (no data yet), timed to
its first picture (`runs/demo/renders-val.png`, drawn at step 250) and to the end of a short run.

    python -m benchmarks.speed.bench_first_picture [--steps 300] [--no-save]

The clone is of this checkout's HEAD (committed files only), in a temporary folder; the command
is the README's `python3 train.py configs/demo.yaml`, here with `--exit-after --steps`. Appends
the times, the machine and the commit to benchmarks/results/first_picture.jsonl.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks.common import ROOT, append_result, environment
from benchmarks.speed.bench_cpu import machine

PICTURE = os.path.join("runs", "demo", "renders-val.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="the run's --exit-after")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        clone = os.path.join(tmp, "osrt-fast")
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        cmd = [sys.executable, "train.py", "configs/demo.yaml", "--exit-after", str(args.steps)]
        log = open(os.path.join(tmp, "out.txt"), "w")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=clone, stdout=log, stderr=subprocess.STDOUT)
        picture = None
        while proc.poll() is None:
            if picture is None and os.path.exists(os.path.join(clone, PICTURE)):
                picture = time.perf_counter() - t0
            time.sleep(0.2)
        total = time.perf_counter() - t0
        log.close()
        out = open(os.path.join(tmp, "out.txt")).read()
        if proc.returncode != 0 or picture is None:
            raise SystemExit(f"the demo command failed (exit {proc.returncode}):\n{out[-3000:]}")
    threads = re.search(r"\((\d+) threads\)", out)
    record = {"bench": "first_picture", "command": "python3 train.py configs/demo.yaml",
              "steps": args.steps, "first_picture_s": picture, "total_s": total,
              "threads": int(threads.group(1)) if threads else None,
              **machine(), **environment()}
    print(f"first picture after {picture:.1f} s, {args.steps} steps done after {total:.1f} s "
          f"(data generated in a fresh clone)")
    if not args.no_save:
        append_result("first_picture", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
