"""The GPU suite's results: its summary, the import of a run's files, and the README's table.

    python -m benchmarks.gpu.suite_report --import DIR   # a run's files (e.g. the device's $OUT)
                                                         # into benchmarks/results/, then the table
    python -m benchmarks.gpu.suite_report                # regenerate the README table
    python -m benchmarks.gpu.suite_report --check        # exit 1 if the README's table is stale

The README's performance table sits between the two marker lines below and is written only by
this script, from the latest non-smoke run of each device in benchmarks/results/suite_*.jsonl,
so no speed in it is typed by hand.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

from benchmarks.common import RESULTS_DIR, ROOT, between_markers

README = os.path.join(ROOT, "README.md")
BEGIN = "<!-- suite-table:begin (written by python -m benchmarks.gpu.suite_report; do not edit) -->"
END = "<!-- suite-table:end -->"


def load_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def latest_run(rows: list[dict]) -> list[dict]:
    """The rows of the last non-smoke run in `rows` (file order), or []."""
    runs = [r["suite_run"] for r in rows if not r.get("smoke")]
    return [r for r in rows if runs and r["suite_run"] == runs[-1]]


def find(rows, **match) -> dict | None:
    """The last measured row (no skip, error or OOM) whose fields equal `match`."""
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())
            and not (r.get("skipped") or r.get("error") or r.get("oom"))]
    return hits[-1] if hits else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def headline(rows: list[dict]) -> list[dict]:
    """The figures the issue's targets name, each as {what, measured, target, met} (met None:
    not measured in this run)."""
    fast = find(rows, bench="train_step", path="fast")
    fast_ckpt = find(rows, bench="train_step", path="fast-ckpt")
    eager32 = find(rows, bench="train_step", path="eager-fp32")
    eager16 = find(rows, bench="train_step", path="eager-bf16")
    ref = find(rows, bench="train_step_largest", path="reference")
    paper = find(rows, bench="train_step_paper_batch")
    decoder = find(rows, bench="block", name="decoder", path="triton", dtype="bf16", mode="fwdbwd")
    frame = find(rows, bench="render", name="frame", path="triton", dtype="bf16", mode="fwd")
    loaders = [r for r in rows if r.get("bench") == "loader" and r.get("scenes_per_s")]
    loader = max(loaders, key=lambda r: r["scenes_per_s"]) if loaders else None
    correct = find(rows, bench="correctness")
    sps = (lambda r: r["scenes_per_s"] if r else None)
    out = []

    def add(what, value, fmt, target, ok=None):
        out.append({"what": what, "measured": fmt.format(value) if value is not None else "not measured",
                    "target": target, "met": None if value is None or ok is None else bool(ok(value))})

    add("fast step vs eager fp32, scenes/s at 32 x 8192", _ratio(sps(fast), sps(eager32)),
        "{:.1f}x", ">= 10x", lambda v: v >= 10)
    add("fast step vs eager bf16", _ratio(sps(fast), sps(eager16)), "{:.2f}x", "-")
    add("fast step vs the reference (its largest batch)", _ratio(sps(fast), sps(ref)), "{:.1f}x",
        ">= 12x", lambda v: v >= 12)
    add("MFU, fast step", fast and fast.get("mfu"), "{:.1%}", ">= 50%", lambda v: v >= 0.5)
    add("MFU, fast step with checkpointing", fast_ckpt and fast_ckpt.get("mfu"), "{:.1%}", ">= 50%",
        lambda v: v >= 0.5)
    add(f"{paper['scenes'] if paper else 256} x 8192 in one optimizer step (fast + checkpointing), ms",
        paper and paper["median_ms"], "{:.0f}", "fits", lambda v: True)
    add("  its peak memory, GiB", paper and paper.get("peak_mem_gib"), "{:.1f}", "-")
    add("decoder fwd+bwd at 32 x 8192, triton vs eager (bf16)", decoder and decoder.get("speedup"),
        "{:.2f}x", ">= 3x", lambda v: v >= 3)
    add("one 128x128 frame from 32 slots, triton bf16, ms", frame and frame["median_ms"], "{:.2f}",
        "<= 1 ms", lambda v: v <= 1.0)
    add("loader scenes/s over the fast step's", _ratio(sps(loader), sps(fast)), "{:.1f}x", ">= 2x",
        lambda v: v >= 2)
    if correct:
        out.append({"what": "correctness tests on the device", "target": "all pass",
                    "measured": f"{correct.get('passed', 0)} passed, {correct.get('failed', 0)} failed, "
                                f"{correct.get('errors', 0)} errors, {correct.get('skipped', 0)} skipped",
                    "met": correct.get("failed", 1) == 0 and correct.get("errors", 1) == 0})
    else:
        out.append({"what": "correctness tests on the device", "target": "all pass",
                    "measured": "not run", "met": None})
    return out


def _mark(met):
    return {True: "yes", False: "**no**", None: "-"}[met]


def headline_table(rows: list[dict]) -> str:
    lines = ["| figure | measured | target | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {h['what']} | {h['measured']} | {h['target']} | {_mark(h['met'])} |"
              for h in headline(rows)]
    return "\n".join(lines)


def conditions(rows: list[dict]) -> str:
    r = rows[0]
    return (f"{r.get('device')}, torch {r.get('torch')}, triton {r.get('triton')}, CUDA "
            f"{r.get('cuda')}, commit `{r.get('commit')}`, {r.get('date')} (run `{r.get('suite_run')}`)")


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def detail_tables(rows: list[dict]) -> str:
    out = ["### Training step (5 input views of 128x128, K = 32, 8192 rays per scene)", "",
           "| path | scenes | ms / step | scenes/s | MFU | peak GiB | vs eager fp32 |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("bench") in ("train_step", "train_step_largest", "train_step_paper_batch"):
            label = {"train_step_largest": " (largest that fits)",
                     "train_step_paper_batch": " (paper batch)"}.get(r["bench"], "")
            scenes = r.get("largest_scenes") or r.get("scenes")
            if r.get("oom") or r.get("skipped") or r.get("error"):
                why = "out of memory" if r.get("oom") else (r.get("skipped") and f"skipped: {r['skipped']}") or f"error: {r['error']}"
                out.append(f"| {r.get('path')}{label} | {scenes} | {why} | | | | |")
                continue
            out.append(f"| {r.get('path')}{label} | {scenes} | {_fmt(r.get('median_ms'), '.1f')} | "
                       f"{_fmt(r.get('scenes_per_s'), '.1f')} | {_fmt(r.get('mfu'), '.1%')} | "
                       f"{_fmt(r.get('peak_mem_gib'), '.1f')} | {_fmt(r.get('speedup_vs_eager_fp32'), '.2f')} |")
    out += ["", "### Kernels", "", "| what | path | dtype | mode | median ms | vs eager |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("bench") in ("op", "block", "render"):
            note = r.get("skipped") or r.get("error")
            out.append(f"| {r.get('name')} | {r.get('path')} | {r.get('dtype')} | {r.get('mode')} | "
                       f"{note or _fmt(r.get('median_ms'), '.3f')} | {_fmt(r.get('speedup'), '.2f')} |")
    out += ["", "### Data", "", "| what | workers | scenes/s |", "| --- | --- | --- |"]
    for r in rows:
        if r.get("bench") == "make_batch":
            out.append(f"| make_batch, {r['scenes']} x {r['rays']} on the device | - | "
                       f"{_fmt(r.get('scenes_per_s'), '.0f')} |")
        elif r.get("bench") == "loader":
            note = r.get("skipped") or r.get("error")
            out.append(f"| loader, {r.get('path')} | {r.get('workers')} | "
                       f"{note or _fmt(r.get('scenes_per_s'), '.0f')} |")
    out += ["", "### Viewer", "", "| model | slots | size | backend | frames/s |",
            "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("bench") == "viewer":
            out.append(f"| {r['model']} | {r['slots']} | {r['height']}x{r['width']} | "
                       f"{r['backend']} | {_fmt(r.get('fps'), '.1f')} |")
    sections = [r for r in rows if r.get("bench") == "section"]
    out += ["", "### Sections", ""]
    out += [f"- {r['name']}: " + (f"skipped ({r['skipped']})" if r.get("skipped") else
                                   f"error: {r['error']}" if r.get("error") else
                                   f"{r['seconds']:.0f} s") for r in sections]
    failures = [f for r in rows if r.get("bench") == "correctness" for f in r.get("failures", [])]
    if failures:
        out += ["", "### Failing tests", ""] + [f"- {f}" for f in failures]
    return "\n".join(out) + "\n"


def markdown(rows: list[dict]) -> str:
    """The summary of one run."""
    if not rows:
        return "# GPU suite\n\nNo rows.\n"
    smoke = " (smoke run: tiny shapes on the CPU; the numbers mean nothing)" if rows[0].get("smoke") else ""
    return (f"# GPU suite{smoke}\n\n{conditions(rows)}\n\n{headline_table(rows)}\n\n"
            f"{detail_tables(rows)}")


def readme_block(results_dir: str = RESULTS_DIR) -> str:
    """The README's table: the latest run of each device, or a note that none has run."""
    parts = []
    for path in sorted(glob.glob(os.path.join(results_dir, "suite_*.jsonl"))):
        rows = latest_run(load_rows(path))
        if rows:
            rel = os.path.relpath(path, ROOT)
            parts.append(f"From `{rel}` ({conditions(rows)}); the whole run: "
                         f"`{os.path.relpath(path[:-len('.jsonl')] + '.md', ROOT)}`.\n\n"
                         f"{headline_table(rows)}")
    if not parts:
        parts.append("The GPU suite (`python -m benchmarks.gpu.suite`, docs/GPU.md) has not run on "
                     "a GPU yet: no speed of the fast path is claimed here.")
    return "\n\n".join(parts)


def update_readme(text: str, block: str) -> str:
    return between_markers(text, BEGIN, END, block, "README.md (the suite table)")


def import_run(src: str, results_dir: str = RESULTS_DIR) -> list[str]:
    """Appends the rows of each suite_*.jsonl in `src` whose runs are not yet in results_dir,
    and copies the summaries and profiles. Returns the files written."""
    written = []
    for path in sorted(glob.glob(os.path.join(src, "suite_*.jsonl"))):
        dest = os.path.join(results_dir, os.path.basename(path))
        have = {r["suite_run"] for r in load_rows(dest)} if os.path.exists(dest) else set()
        new = [r for r in load_rows(path) if r["suite_run"] not in have and not r.get("smoke")]
        if new:
            with open(dest, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
            written.append(dest)
    for path in glob.glob(os.path.join(src, "suite_*.md")) + glob.glob(os.path.join(src, "suite_*_profile.txt")):
        dest = os.path.join(results_dir, os.path.basename(path))
        shutil.copyfile(path, dest)
        written.append(dest)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.suite_report",
                                description=__doc__.splitlines()[0])
    p.add_argument("--import", dest="src", help="a folder with a suite run's files")
    p.add_argument("--check", action="store_true", help="exit 1 if the README's table is stale")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--readme", default=README)
    args = p.parse_args(argv)
    if args.src:
        for path in import_run(args.src, args.results_dir):
            print(f"wrote {os.path.relpath(path, ROOT)}")
    text = open(args.readme).read()
    new = update_readme(text, readme_block(args.results_dir))
    if args.check:
        if new != text:
            print("README.md's suite table is stale: run python -m benchmarks.gpu.suite_report")
            return 1
        return 0
    if new != text:
        with open(args.readme, "w") as f:
            f.write(new)
        print("README.md's suite table regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
