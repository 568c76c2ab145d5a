"""One error family: every error bad input raises derives from errors.UserError, and every command
reports one as a single line on stderr with exit code 2 (errors.command), never a traceback."""
import ast
import importlib
import os

import pytest

from osrt_fast import errors
from osrt_fast.checkpoint import CheckpointError
from osrt_fast.config import ConfigError
from osrt_fast.data import DataError
from osrt_fast.files import WriteError
from osrt_fast.locks import LockedError
from osrt_fast.slots import SlotsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_user_facing_error_is_a_user_error_and_still_what_it_was():
    for cls, builtin in ((ConfigError, ValueError), (DataError, ValueError), (SlotsError, ValueError),
                         (errors.UsageError, ValueError), (WriteError, RuntimeError),
                         (LockedError, RuntimeError), (CheckpointError, RuntimeError),
                         (errors.MissingExtra, ImportError)):
        assert issubclass(cls, errors.UserError) and issubclass(cls, builtin), cls


def command_modules() -> list:
    """The osrt_fast modules run as commands (`if __name__ == "__main__"`) with a `main`."""
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "osrt_fast")):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and '__name__ == "__main__"' in open(path).read():
                found.append(os.path.relpath(path, ROOT)[:-3].replace(os.sep, "."))
    return sorted(found)


def test_every_command_is_wrapped_by_errors_command():
    """Structural, so a new command cannot forget it: each command module's `main` is decorated
    with `command` (a bare name or errors.command)."""
    modules = command_modules() + ["osrt_fast.trainer"]       # train.py's main
    assert {"osrt_fast.evaluate", "osrt_fast.encode", "osrt_fast.view", "osrt_fast.scenes",
            "osrt_fast.data.check", "osrt_fast.data.shards"} <= set(modules)
    for module in modules:
        tree = ast.parse(open(os.path.join(ROOT, *module.split(".")) + ".py").read())
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        assert mains, f"{module} has no main"
        names = [d.id if isinstance(d, ast.Name) else getattr(d, "attr", None)
                 for d in mains[0].decorator_list]
        assert "command" in names, f"{module}.main is not wrapped by errors.command"


@pytest.mark.parametrize("module", ["osrt_fast.trainer", "osrt_fast.evaluate", "osrt_fast.encode",
                                    "osrt_fast.view", "osrt_fast.data.check", "osrt_fast.data.shards"])
def test_a_missing_config_is_one_line_and_exit_2(module, tmp_path, capsys):
    argv = [str(tmp_path / "nowhere.yaml")] + (["--out", str(tmp_path / "o")]
                                               if module.endswith("shards") else [])
    assert importlib.import_module(module).main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config file") and "does not exist" in err[0], err


def test_the_scene_generator_reports_bad_settings_in_one_line(tmp_path, capsys):
    from osrt_fast.scenes import main
    assert main(["--out", str(tmp_path / "s"), "--num-scenes", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_scenes must be at least 1" in err[0]


def test_command_leaves_other_errors_alone():
    """A bug keeps its traceback: only UserErrors become one line."""
    @errors.command
    def main(argv=None):
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        main([])


@pytest.mark.parametrize("command", ["evaluate", "encode"])
def test_an_output_that_cannot_be_written_is_one_line_naming_the_flag(command, tiny_run, tmp_path,
                                                                      capsys):
    """Writing into a path that cannot hold a file (its folder is a file): exit 2, one line
    naming the flag that writes elsewhere; evaluate has printed its metrics before."""
    config, _ = tiny_run
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = str(blocker / "result")
    module = importlib.import_module(f"osrt_fast.{command}")
    flag = "--output" if command == "evaluate" else "--out"
    extra = ["--max-eval", "2"] if command == "evaluate" else ["--scenes", "0:1"]
    assert module.main([config, "--no-cuda", flag, out] + extra) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {out}") and flag in err[0], err
    if command == "evaluate":
        assert '"psnr"' in captured.out
