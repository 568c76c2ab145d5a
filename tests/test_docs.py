"""The README (a front page) and the docs/ pages hold only what is true of the repository: every
link and image resolves, every file path they name exists, and every flag of every command they
show is a flag of that command (its --help lists it)."""
import contextlib
import glob
import importlib
import importlib.util
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
# Paths a reader's own runs create (runs/, data/, a learning run's run/) or that stand for many
# (placeholders) are not files of the repository.
PATH = re.compile(r"(?<![\w./-])((?:configs|benchmarks|docs|tests|osrt_fast|kernels)/[\w./-]*\w\.(?:py|yaml|md|png|mp4|jsonl|json|pt|txt|toml|npz))\b")


def page_id(path: str) -> str:
    return os.path.relpath(path, ROOT)


def test_the_readme_is_a_front_page():
    assert len(open(PAGES[0]).read().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_and_images_resolve(page):
    text = open(page).read()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
        if not os.path.exists(path):
            missing.append(target)
    assert not missing, f"{page_id(page)} links to what is not there: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_files_exist(page):
    text = open(page).read()
    missing = sorted({p for p in PATH.findall(text) if "/run/" not in p     # a run's own files
                      and not os.path.exists(os.path.join(ROOT, p))})
    assert not missing, f"{page_id(page)} names files that are not in the repository: {missing}"


def help_text(command: str) -> str:
    """--help of `command`: a module (`osrt_fast.evaluate`, `benchmarks.speed.bench_loader`) or a
    script (`render.py`), run in-process."""
    if command.endswith(".py"):
        spec = importlib.util.spec_from_file_location("doc_" + re.sub(r"\W", "_", command),
                                                      os.path.join(ROOT, command))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(command)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main(["--help"])
    return out.getvalue()


COMMAND = re.compile(r"python3? (?:-m ([\w.]+)|([\w/]+\.py))((?: +[^`\n|#]*)?)")


def commands_and_flags() -> dict:
    """command -> {flag: pages that show it} over every page."""
    found = {}
    for page in PAGES:
        for module, script, rest in COMMAND.findall(open(page).read()):
            command = module or script
            if command == "tests/browser.py":      # CONFIG OUT.png, then the viewer's options
                command = "osrt_fast.view"
            if (command in ("pip", "pytest", "torch.distributed.run")
                    or command.startswith("benchmarks.gpu.suite")):
                continue        # not ours, or documented by its own page (docs/GPU.md)
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                found.setdefault(command, {}).setdefault(flag, set()).add(page_id(page))
    return found


def test_every_flag_shown_is_a_flag_of_its_command():
    unknown = []
    for command, flags in sorted(commands_and_flags().items()):
        if not (command.endswith(".py") and os.path.exists(os.path.join(ROOT, command))) \
                and importlib.util.find_spec(command) is None:
            unknown.append(f"{command} (no such command) in {sorted(set().union(*flags.values()))}")
            continue
        text = help_text(command)
        unknown += [f"{command} {flag} in {sorted(pages)}" for flag, pages in flags.items()
                    if not re.search(re.escape(flag) + r"(?![\w-])", text)]
    assert not unknown, "commands shown with flags they do not have:\n" + "\n".join(unknown)


def test_the_learning_study_table_is_the_results():
    """docs/learning.md's study table is what the committed curves give (learning_study --check)."""
    from benchmarks.learning import learning_study
    assert learning_study.main(["--check"]) == 0
    assert learning_study.main(["--family", "full", "--check"]) == 0


def test_the_generalisation_table_is_the_results():
    """docs/learning.md's generalisation table is what benchmarks/results/generalise.jsonl
    gives (bench_generalise --check)."""
    from benchmarks.learning import bench_generalise
    assert bench_generalise.main(["--check"]) == 0


def test_no_two_files_differ_only_in_case():
    """macOS and Windows clones keep one of two names that differ only in case."""
    seen = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and not (folder == ROOT and d in ("data", "runs", "build"))]      # made by runs
        for name in dirs + files:
            path = os.path.relpath(os.path.join(folder, name), ROOT)
            other = seen.setdefault(path.lower(), path)
            assert other == path, f"{other} and {path} differ only in case"
