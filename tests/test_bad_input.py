"""Bad input a new user met, each answered by one message that names the problem and the fix
(exit 2 from a command), and the short run that still shows what it learned."""
import json
import os

import pytest
import yaml

from osrt_fast import OSRT
from osrt_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from osrt_fast.config import ConfigError, config_from_dict, load_config
from osrt_fast.progress import ProgressLines, duration
from osrt_fast.runs import parse_train_args
from conftest import tiny_data_section, tiny_model_config


@pytest.mark.parametrize("raw, said", [
    ({"training": {"bach_size": 4}}, "'training.bach_size' (did you mean 'batch_size'?)"),
    ({"data": {"num_point": 4}}, "'data.num_point' (did you mean 'num_points'?)"),
    ({"model": {"encoder_kwargs": {"num_slot": 4}}}, "'num_slot' (did you mean 'num_slots'?)"),
    ({"model": {"decoder": "slot_mixr"}}, "'slot_mixr' (did you mean 'slot_mixer'?)"),
    ({"data": {"dataset": "procedural", "kwargs": {"num_view": 4}}},
     "'num_view' (did you mean 'num_views'?)"),
])
def test_a_mistyped_config_key_names_the_nearest_valid_one(raw, said):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert said in str(e.value)


def test_nothing_is_suggested_when_nothing_is_close():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"training": {"zzzzzz": 1}})
    assert "did you mean" not in str(e.value) and "valid keys in 'training'" in str(e.value)


def test_a_folder_or_a_mistyped_name_as_the_config(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a config file: pass a config file, "
                                          "such as configs/demo.yaml"):
        load_config(str(tmp_path))
    (tmp_path / "config.yaml").write_text("{}")
    with pytest.raises(ConfigError, match=r"is a folder.*config.yaml, the run folder's"):
        load_config(str(tmp_path))
    with pytest.raises(ConfigError, match=r"does not exist \(did you mean '.*config.yaml'\?\)"):
        load_config(str(tmp_path / "config.yml"))


@pytest.mark.parametrize("argv, said", [
    (["--exit-after", "-1"], "expected a whole number >= 0, got '-1'"),
    (["--max-minutes", "-5"], "expected a number of minutes > 0, got '-5'"),
    (["--max-minutes", "nan"], "expected a number of minutes > 0, got 'nan'"),
    (["--max-eval", "0"], "expected a whole number >= 1, got '0'"),
])
def test_budgets_that_mean_nothing_are_refused(argv, said, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_train_args(["c.yaml"] + argv)
    assert stop.value.code == 2 and said in capsys.readouterr().err
    assert parse_train_args(["c.yaml", "--exit-after", "0"]).exit_after == 0


@pytest.mark.parametrize("command", ["evaluate", "render"])
def test_a_mistyped_checkpoint_names_the_flag_and_the_nearest_file(command, tiny_run, capsys):
    import importlib
    config, _ = tiny_run
    typo = os.path.join(os.path.dirname(config), "model.pth")
    main = importlib.import_module(f"osrt_fast.{command}").main
    assert main([config, "--no-cuda", "--checkpoint", typo]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{typo}' (--checkpoint) does not exist (did you mean " \
        f"'{typo[:-1]}'?)" in err[0], err


def test_a_checkpoint_of_another_shape_says_what_differs_in_a_few_lines(tmp_path):
    """Not every mismatched tensor and the whole config: a few shapes, then the config entries
    that differ."""
    path = str(tmp_path / "model.pt")
    base = tiny_model_config()
    wide = tiny_model_config(encoder_kwargs={**base["encoder_kwargs"], "slot_dim": 48, "latent_dim": 48},
                             decoder_kwargs={**base["decoder_kwargs"], "slot_dim": 48})
    save_checkpoint(path, OSRT(wide), it=1)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, OSRT(tiny_model_config()))
    lines = str(e.value).splitlines()
    assert len(lines) <= 12, lines
    assert any(x.strip().startswith("...") and x.strip().endswith("more") for x in lines), lines
    assert "  encoder_kwargs.slot_dim: checkpoint 48, config 32" in lines
    assert "  encoder_kwargs.latent_dim: checkpoint 48, config 32" in lines
    assert lines[-1] == "Use the config it was trained with (its run folder's config.yaml)."


def test_scene_ids_out_of_range_count_scenes_and_input_view_choices(tiny_run, capsys):
    from osrt_fast.render import main
    config, _ = tiny_run
    assert main([config, "--no-cuda", "--novideo", "--sceneid", "5000"]) == 2
    err = capsys.readouterr().err
    # The tiny val set: 2 scenes of 3 views (procedural splits are 90 / 5 / 5 %: 2 of 40).
    assert "the val set has 6 items (2 scenes, each with 3 choices of input views), so " \
           "--sceneid takes 0 to 5" in err, err


def _short_run(tmp_path, data_dir, *flags):
    from osrt_fast.trainer import main
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "data": tiny_data_section(data_dir), "model": tiny_model_config(),
        "training": {"batch_size": 2, "num_workers": 0, "print_every": 1, "validate_every": 100,
                     "visualize_every": 100, "checkpoint_every": 100, "vis_scenes": 1,
                     "max_it": 1000}}))
    assert main([str(run / "config.yaml"), "--exit-after", "3", *flags]) == 0
    return run, [json.loads(x) for x in open(run / "log.jsonl")]


def test_a_run_stopped_between_evaluations_evaluates_and_draws_once(tmp_path, data_dir, capsys):
    run, log = _short_run(tmp_path, data_dir)
    assert [r["it"] for r in log if r.get("split") == "val"] == [3]
    assert (run / "renders-val.png").is_file() and (run / "model_best.pt").is_file()
    assert "one more at iteration 3" in capsys.readouterr().out


def test_no_final_look_leaves_them_out(tmp_path, data_dir):
    run, log = _short_run(tmp_path, data_dir, "--no-final-look")
    assert not [r for r in log if r.get("split") == "val"]
    assert not (run / "renders-val.png").exists()


def test_progress_lines_give_counts_rate_and_time_left(capsys):
    bar = ProgressLines(10, "generating data/x", "scene", every=0)
    bar.update(4)
    bar.update(6)           # done: no line until close
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("generating data/x: 4/10 scenes (40%), ") and "left" in lines[0]
    assert lines[1].startswith("generating data/x: 10/10 scenes (100%), ") and " in " in lines[1]
    assert [duration(s) for s in (5, 200, 4000)] == ["5 s", "3 min 20 s", "1 h 06 min"]


def test_a_relative_data_path_missing_here_is_found_beside_the_config(tmp_path, monkeypatch, capsys):
    """Started from another folder, a clone's config finds the clone's data, not a new copy."""
    project, elsewhere = tmp_path / "clone", tmp_path / "elsewhere"
    (project / "configs").mkdir(parents=True)
    (project / "data" / "scenes").mkdir(parents=True)
    elsewhere.mkdir()
    config = project / "configs" / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": "data/scenes"}}))
    monkeypatch.chdir(elsewhere)
    assert load_config(str(config)).data.path == str(project / "data" / "scenes")
    assert "data.path 'data/scenes' is not in the current folder; using" in capsys.readouterr().out
    # A run's copy, two folders further down, finds it too.
    (project / "runs" / "c").mkdir(parents=True)
    (project / "runs" / "c" / "config.yaml").write_text(config.read_text())
    assert load_config(str(project / "runs" / "c" / "config.yaml")).data.path == \
        str(project / "data" / "scenes")
    # Here: the current folder's, and nothing said.
    (elsewhere / "data" / "scenes").mkdir(parents=True)
    capsys.readouterr()
    assert load_config(str(config)).data.path == "data/scenes"
    assert capsys.readouterr().out == ""
    # Nowhere: as written (the built-in data is generated there).
    config.write_text(yaml.safe_dump({"data": {"path": "data/other"}}))
    assert load_config(str(config)).data.path == "data/other"


def test_outputs_of_a_checkpoint_from_elsewhere_go_to_their_own_folder(tiny_run, tmp_path,
                                                                        monkeypatch):
    from osrt_fast.evaluate import main
    from osrt_fast.runs import output_dir_for
    assert output_dir_for("configs/demo.yaml") == os.path.join("runs", "demo")
    assert output_dir_for("configs/demo.yaml", "configs/demo.pt") == \
        os.path.join("runs", "checkpoint-demo")
    assert output_dir_for("configs/demo.yaml", "runs/demo/model_100.pt") == os.path.join("runs", "demo")
    assert output_dir_for("configs/demo.yaml", "configs/demo.pt", "mine") == "mine"
    config, _ = tiny_run
    borrowed = tmp_path / "shipped.pt"
    borrowed.write_bytes(open(os.path.join(os.path.dirname(config), "model.pt"), "rb").read())
    monkeypatch.chdir(tmp_path)
    assert main([config, "--no-cuda", "--checkpoint", str(borrowed), "--max-eval", "2"]) == 0
    assert (tmp_path / "runs" / "checkpoint-shipped" / "eval_val.json").is_file()
    assert not os.path.exists(os.path.join(os.path.dirname(config), "eval_val.json"))


def test_render_into_a_folder_it_cannot_write_is_one_line(tiny_run, tmp_path, capsys):
    """The render folder cannot be made (a file stands where it goes): exit 2, one line naming
    the path, no traceback."""
    from osrt_fast.render import main
    config, _ = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(open(config).read())
    os.link(os.path.join(os.path.dirname(config), "model.pt"), run / "model.pt")
    (run / "render").write_text("a file where the renders go")
    assert main([str(run / "config.yaml"), "--no-cuda", "--novideo", "--num-frames", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write ") and "render" in err[0], err


def test_checkpoints_are_as_readable_as_the_run_s_other_files(tmp_path, data_dir):
    from osrt_fast.files import file_mode
    run, _ = _short_run(tmp_path, data_dir, "--no-final-look")
    for name in ("model.pt", "log.jsonl", "config.yaml"):
        assert os.stat(run / name).st_mode & 0o777 == file_mode(), name
