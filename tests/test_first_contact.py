"""The README's first command as a user types it: train.py on configs/demo.yaml, from a fresh
folder (the demo's 5000 built-in scenes are generated on first use), stopped after two steps."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_readme_demo_command_trains(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "python3 train.py configs/demo.yaml" in readme
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "configs/demo.yaml",
                           "--exit-after", "2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "demo"
    assert (run / "model.pt").is_file() and (run / "config.yaml").is_file()
    assert (tmp_path / "data" / "demo_scenes" / "metadata.npz").is_file()
    assert "Reached iteration 2" in proc.stdout and "\r" not in proc.stdout + proc.stderr


MODULES = ("osrt_fast.evaluate", "osrt_fast.encode", "osrt_fast.view", "osrt_fast.scenes",
           "osrt_fast.data.check", "osrt_fast.data.kubric", "osrt_fast.data.nmr",
           "osrt_fast.data.shards", "osrt_fast.data.posed", "osrt_fast.render")


@pytest.mark.parametrize("module", MODULES)
def test_help_names_the_real_invocation(module, capsys):
    """`python -m osrt_fast.evaluate --help` says `usage: python -m osrt_fast.evaluate`, not the
    file's name; every module with a command line is listed here."""
    import importlib
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(["--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")


def test_every_command_line_module_is_checked():
    found = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "osrt_fast")):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and 'if __name__ == "__main__":' in open(path).read():
                found.add(os.path.relpath(path, ROOT)[:-3].replace(os.sep, "."))
    assert found == set(MODULES)


def test_exit_after_says_it_counts_from_the_start(capsys):
    from osrt_fast.runs import parse_train_args
    with pytest.raises(SystemExit):
        parse_train_args(["--help"])
    assert "at iteration N, counted from the run's start" in " ".join(capsys.readouterr().out.split())


def demo_variant(tmp_path, edit) -> str:
    """configs/demo.yaml with `edit(cfg)` applied, its data in tmp_path/data, as tmp_path/NAME.yaml."""
    import yaml
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "demo.yaml")))
    cfg["data"]["path"] = str(tmp_path / "data")
    name = edit(cfg)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_an_image_size_the_encoder_cannot_take_is_refused_before_generating(tmp_path, monkeypatch, capsys):
    """30x30 built-in data: refused at once, naming a size that works; nothing generated, and
    the run folder the failed start made is gone."""
    from osrt_fast import trainer

    def edit(cfg):
        cfg["data"]["kwargs"].update(height=30, width=30)
        return "size30"
    config = demo_variant(tmp_path, edit)
    monkeypatch.chdir(tmp_path)
    assert trainer.main([config, "--exit-after", "1"]) == 2
    err = capsys.readouterr().err
    assert "30x30" in err and "32x32" in err
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")


def test_a_failed_start_says_what_it_left(tmp_path, capsys):
    """A run folder holding only the copied config and the lock is removed; one holding more is
    left, with a note of what is in it."""
    from osrt_fast.runs import remove_unstarted_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("x")
    (run / ".lock").write_text("")
    remove_unstarted_run(str(run))
    assert not run.exists()
    run.mkdir()
    (run / "log.jsonl").write_text("{}")
    remove_unstarted_run(str(run))
    assert run.exists() and "log.jsonl" in capsys.readouterr().err


def test_a_model_key_typo_names_the_config_file(tmp_path, monkeypatch, capsys):
    """`num_slot` in model.encoder_kwargs: train.py and evaluate name the file, as they do for a
    typo in `training`."""
    from osrt_fast import trainer
    from osrt_fast.evaluate import main as evaluate_main

    def edit(cfg):
        cfg["model"]["encoder_kwargs"]["num_slot"] = cfg["model"]["encoder_kwargs"].pop("num_slots")
        return "typo"
    config = demo_variant(tmp_path, edit)
    monkeypatch.chdir(tmp_path)
    assert trainer.main([config, "--exit-after", "1"]) == 2
    assert evaluate_main([config, "--checkpoint", os.path.join(ROOT, "configs", "demo.pt"), "--no-cuda"]) == 2
    for line in capsys.readouterr().err.strip().splitlines():
        assert line.startswith(f"error: {config}: unknown key(s) 'num_slot' (did you mean "
                               f"'num_slots'?) in model.encoder_kwargs")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
