"""Nothing lost, nothing silently wrong: signals, concurrent runs, divergence, damaged
checkpoints, full and read-only disks (docs/reliability.md).

Each test runs the fault for real where it can: signals are sent to real processes (the whole
process group, as SLURM does), a second train.py runs beside the first, a diverging learning
rate diverges, a full disk is /dev/full or a 1 MB tmpfs.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import osrt_fast.checkpoint as checkpoint
import osrt_fast.trainer as trainer
from conftest import tiny_data_section, tiny_model_config
from osrt_fast import OSRT
from osrt_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from osrt_fast.config import DivergenceConfig
from osrt_fast.guards import DivergenceError, StepGuard
from osrt_fast.signals import GracefulStop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def write_run(folder, data_dir, **training):
    opts = {"batch_size": 4, "num_workers": 0, "print_every": 1, "visualize_every": 0,
            "validate_every": 0, "checkpoint_every": 100, "backup_every": 0, "max_it": 12,
            "lr_warmup": 2, "peak_lr": 1e-3, "eval_batch_size": 4, "vis_scenes": 2, "device": "cpu"}
    opts.update(training)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"data": tiny_data_section(data_dir), "model": tiny_model_config(), "training": opts}, f)
    return path


def weights(path):
    model = OSRT(tiny_model_config())
    state = load_checkpoint(path, model)
    return state["it"], model.state_dict()


def assert_same_weights(a_path, b_path):
    (it_a, a), (it_b, b) = weights(a_path), weights(b_path)
    assert it_a == it_b
    for k in a:
        assert torch.equal(a[k], b[k]), k


def logged_its(folder):
    path = os.path.join(folder, "log.jsonl")
    return [json.loads(x)["it"] for x in open(path)] if os.path.exists(path) else []


def start_train(config, *args):
    """train.py in a new session (its own process group, as a cluster job step)."""
    env = dict(os.environ, PYTHONPATH=ROOT)      # the threads of this process: the same sums
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), config, *args], cwd=ROOT,
                            env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_steps(proc, folder, n, timeout=240):
    deadline = time.time() + timeout
    while len(logged_its(folder)) < n:
        assert proc.poll() is None, f"train.py ended early:\n{proc.communicate()[0][-3000:]}"
        assert time.time() < deadline, "train.py made no progress"
        time.sleep(0.05)


# -- signals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_every_process_saves_and_the_run_resumes_exactly(tmp_path, data_dir, signum):
    """SIGTERM (pre-emption) or SIGUSR1 (SLURM's warning) sent to the whole process group, the
    DataLoader worker included: the step finishes, model.pt holds it, exit 128 + signal; the
    resumed run ends where an uninterrupted one does, bit for bit."""
    straight = write_run(tmp_path / "straight", data_dir, max_it=40, num_workers=1)
    assert trainer.main([straight]) == 0
    run = write_run(tmp_path / "signalled", data_dir, max_it=40, num_workers=1)
    proc = start_train(run)
    wait_for_steps(proc, tmp_path / "signalled", 3)
    os.killpg(proc.pid, signum)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signum, out[-3000:]
    assert f"{signal.Signals(signum).name}: stopping after this step" in out
    it, _ = weights(tmp_path / "signalled" / "model.pt")
    assert it == logged_its(tmp_path / "signalled")[-1] < 40, out[-2000:]
    assert trainer.main([run]) == 0
    assert_same_weights(tmp_path / "straight" / "model.pt", tmp_path / "signalled" / "model.pt")


def test_kill_9_at_random_moments_never_leaves_a_broken_checkpoint(tmp_path, data_dir):
    """train.py saving every step, killed with SIGKILL at random moments (mid-step and, by
    chance, mid-save) five times: each time model.pt loads whole, and the runs end where an
    uninterrupted one does."""
    import random
    rng = random.Random(0)
    run = write_run(tmp_path / "run", data_dir, max_it=30, checkpoint_every=1, num_workers=1)
    for _ in range(5):
        proc = start_train(run)
        # Two new steps: the second writes the first's checkpoint (guards.py), so model.pt exists.
        wait_for_steps(proc, tmp_path / "run", len(logged_its(tmp_path / "run")) + 2)
        time.sleep(rng.uniform(0.0, 0.3))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        it, _ = weights(tmp_path / "run" / "model.pt")       # loads whole, every time
        assert 0 < it <= logged_its(tmp_path / "run")[-1]
    assert trainer.main([run]) == 0
    assert weights(tmp_path / "run" / "model.pt")[0] == 30
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(".tmp-")]


@pytest.mark.parametrize("after_the_update", [False, True])
def test_second_ctrl_c_during_the_optimizer_step_never_saves_half_a_step(
        tmp_path, data_dir, monkeypatch, after_the_update):
    """Two Ctrl-C inside optimizer.step() (before or after the update is applied): the second
    waits for the step and its count, so the saved iteration matches the saved weights and
    the resumed run equals the straight one."""
    straight = write_run(tmp_path / "straight", data_dir)
    assert trainer.main([straight]) == 0
    real, calls = torch.optim.Adam.step, []

    def step_with_two_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4 and not after_the_update:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        out = real(self, *args, **kwargs)
        if len(calls) == 4 and after_the_update:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", step_with_two_ctrl_c)
    run = write_run(tmp_path / "interrupted", data_dir)
    assert trainer.main([run]) == 130
    assert weights(tmp_path / "interrupted" / "model.pt")[0] == 4
    monkeypatch.setattr(torch.optim.Adam, "step", real)
    assert trainer.main([run]) == 0
    assert_same_weights(tmp_path / "straight" / "model.pt", tmp_path / "interrupted" / "model.pt")


def test_graceful_stop_defers_a_second_ctrl_c_only_inside_critical_sections():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM and stop.exit_code == 143
        os.kill(os.getpid(), signal.SIGTERM)          # a second SIGTERM changes nothing
        with pytest.raises(KeyboardInterrupt):
            with stop.critical():
                os.kill(os.getpid(), signal.SIGINT)   # deferred to the end of the section
                reached = True
        assert reached
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)       # outside: at once
            time.sleep(1)
    assert {s: signal.getsignal(s) for s in before} == before         # handlers restored


# -- concurrent runs --------------------------------------------------------------------------

def test_a_second_run_on_a_run_directory_is_refused_naming_the_first(tmp_path, data_dir, capsys):
    run = write_run(tmp_path / "run", data_dir, max_it=100000)
    first = start_train(run)
    try:
        wait_for_steps(first, tmp_path / "run", 1)
        log_before = logged_its(tmp_path / "run")
        assert trainer.main([run]) == 2
        err = capsys.readouterr().err
        assert f"run directory '{tmp_path / 'run'}' is in use by another process (pid {first.pid}" in err
        assert "--run-dir" in err
        assert logged_its(tmp_path / "run")[:len(log_before)] == log_before
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143
    assert trainer.main([run, "--exit-after", str(logged_its(tmp_path / "run")[-1] + 1)]) == 0


def test_stale_temporary_checkpoints_are_removed_at_start(tmp_path, data_dir, capsys):
    run = write_run(tmp_path / "run", data_dir, max_it=1)
    stale = tmp_path / "run" / ".tmp-killed.pt"
    stale.write_bytes(bytes(3 << 20))
    assert trainer.main([run]) == 0
    assert not stale.exists()
    assert "Removed temporary files of interrupted saves" in capsys.readouterr().out


# -- divergence -------------------------------------------------------------------------------

def test_a_diverged_run_keeps_the_last_good_checkpoint_and_resumes_with_a_lower_lr(tmp_path, data_dir, capsys):
    """peak_lr 1e6 with a checkpoint every step: the run stops (exit 3) and model.pt holds
    weights whose loss was measured sane; the same run with peak_lr 1e-3 resumes and finishes."""
    run = write_run(tmp_path / "run", data_dir, peak_lr=1e6, lr_warmup=1, checkpoint_every=1, max_it=20)
    with pytest.warns(UserWarning):
        assert trainer.main([run]) == 3
    assert "holds the last weights whose loss was checked" in capsys.readouterr().err
    it, state = weights(tmp_path / "run" / "model.pt")
    assert it < 20 and max(v.abs().max().item() for v in state.values()) < 10
    write_run(tmp_path / "run", data_dir, peak_lr=1e-3, lr_warmup=1, checkpoint_every=1, max_it=20)
    assert trainer.main([run]) == 0
    assert weights(tmp_path / "run" / "model.pt")[0] == 20


def scaled_loss(monkeypatch, factor_at):
    real = trainer.compute_loss
    calls = []

    def scaled(model, batch, max_rays=None, **kwargs):
        calls.append(1)
        mse, terms = real(model, batch, max_rays, **kwargs)
        return mse * factor_at(len(calls)), terms
    monkeypatch.setattr(trainer, "compute_loss", scaled)


def test_a_one_off_loss_spike_is_skipped_and_the_run_goes_on(tmp_path, data_dir, monkeypatch):
    scaled_loss(monkeypatch, lambda call: 50.0 if call == 5 else 1.0)
    run = write_run(tmp_path / "run", data_dir, max_it=8)
    with pytest.warns(UserWarning, match="spike at iteration 4: loss .* is .*x the median"):
        assert trainer.main([run]) == 0
    assert 5 not in logged_its(tmp_path / "run") and weights(tmp_path / "run" / "model.pt")[0] == 8


def test_lasting_spikes_stop_the_run_without_replacing_the_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    scaled_loss(monkeypatch, lambda call: 50.0 if call >= 6 else 1.0)
    run = write_run(tmp_path / "run", data_dir, max_it=30, checkpoint_every=2)
    with pytest.warns(UserWarning, match="spike"):
        assert trainer.main([run]) == 3
    err = capsys.readouterr().err
    # model.pt of iteration 4 was written once step 5 had measured it; the one of iteration 6
    # waited for step 7's loss, a spike, so it was never written.
    assert "the run diverged: 5 spikes in a row" in err and "(iteration 4)" in err
    assert weights(tmp_path / "run" / "model.pt")[0] == 4


def test_step_guard_judges_against_the_recent_median():
    guard = StepGuard(3, DivergenceConfig(loss_factor=4, grad_norm_factor=10, window=3, max_spikes=3))
    t = torch.tensor
    assert guard.step_is_good(t(1.0), t(1.0), 0)                 # no history: accepted
    for loss in (1.0, 2.0, 3.0):
        assert guard.step_is_good(t(loss), t(1.0), 1)
    assert guard.step_is_good(t(7.9), t(1.0), 2)                 # under 4 x median(1, 2, 3)
    with pytest.warns(UserWarning, match="loss 40 is 13.3x the median of the last 3"):
        assert not guard.step_is_good(t(40.0), t(1.0), 2)       # median(2, 3, 7.9) = 3
    with pytest.warns(UserWarning, match="gradient norm 50 is 50.0x"):
        assert not guard.step_is_good(t(3.0), t(50.0), 3)
    with pytest.warns(UserWarning, match="non-finite gradients"):
        assert not guard.step_is_good(t(3.0), t(float("inf")), 4)
    with pytest.raises(DivergenceError, match="3 spikes in a row at iteration 5"), pytest.warns(UserWarning):
        guard.step_is_good(t(40.0), t(1.0), 5)
    assert guard.weights_are_sane(t(3.0)) is None
    assert "their loss is nan" in guard.weights_are_sane(t(float("nan")))
    off = StepGuard(3, DivergenceConfig(loss_factor=0, grad_norm_factor=0))
    assert off.step_is_good(t(1.0), t(1.0), 0) and off.step_is_good(t(1e6), t(1e6), 1)


# -- damaged checkpoints ----------------------------------------------------------------------

@pytest.fixture
def good_checkpoint(tmp_path):
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, OSRT(tiny_model_config()), it=3)
    return path


@pytest.mark.parametrize("content, message", [
    (os.urandom(4096), "is not a PyTorch checkpoint"),
    (b"", "is empty"),
    (b"encoder: weights\n", "is not a PyTorch checkpoint"),
    (None, "is damaged: it could not be read"),                # the first half of a real file
])
def test_a_damaged_file_is_named_as_such(good_checkpoint, tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content if content is not None else open(good_checkpoint, "rb").read()[:2000])
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(str(path), OSRT(tiny_model_config()))
    assert "weights_only=False" not in str(e.value)           # never point at unsafe loading


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(it="abc"), "'it' is 'abc', expected a whole number"),
    (lambda s: s.update(t=[1]), "'t' is \\[1\\], expected a number"),
    (lambda s: s.update(osrt_fast=5), "its 'osrt_fast' entry is a int"),
    (lambda s: s["osrt_fast"].update(rng="x"), "'osrt_fast.rng' is 'x'"),
    (lambda s: s["osrt_fast"].update(world_size=0), "'osrt_fast.world_size' is 0"),
])
def test_malformed_entries_are_named(good_checkpoint, tmp_path, change, message):
    state = torch.load(good_checkpoint, weights_only=True)
    state["osrt_fast"]["rng"] = {"torch": torch.get_rng_state()}
    change(state)
    path = str(tmp_path / "bad.pt")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, OSRT(tiny_model_config()))


def test_non_finite_weights_are_refused_by_evaluate_and_resume(tmp_path, data_dir, capsys):
    from osrt_fast.evaluate import main as evaluate_main
    run = write_run(tmp_path / "run", data_dir, max_it=2)
    assert trainer.main([run]) == 0
    path = str(tmp_path / "run" / "model.pt")
    state = torch.load(path, weights_only=True)
    key = next(k for k, v in state["decoder"].items() if v.is_floating_point())
    state["decoder"][key].view(-1)[0] = float("nan")
    torch.save(state, path)
    assert evaluate_main([run]) == 2
    assert f"non-finite (NaN or infinite) weights (decoder.{key}" in capsys.readouterr().err
    write_run(tmp_path / "run", data_dir, max_it=4)
    assert trainer.main([run]) == 2


def test_a_changed_byte_in_the_weights_is_found(good_checkpoint, tmp_path):
    """The weights' SHA-256 is saved with them: a changed value is named, not loaded; flipped
    bits anywhere in the file are refused as damage."""
    state = torch.load(good_checkpoint, weights_only=True)
    key = next(k for k, v in state["encoder"].items() if v.is_floating_point())
    state["encoder"][key].view(-1)[0] += 1e-3
    path = str(tmp_path / "changed.pt")
    torch.save(state, path)
    with pytest.raises(checkpoint.DamagedCheckpoint, match="its weights differ from what was written"):
        load_checkpoint(path, OSRT(tiny_model_config()))
    data = open(good_checkpoint, "rb").read()
    for at in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
        with pytest.raises(checkpoint.DamagedCheckpoint):
            load_checkpoint(str(tmp_path / "flipped.pt"), OSRT(tiny_model_config()))


def test_resume_falls_back_to_the_newest_good_checkpoint(tmp_path, data_dir, capsys):
    """model.pt cut short and the newest backup changed: the run names both, resumes from the
    next good backup and trains on; with every checkpoint damaged it stops with the first one's
    error instead of starting from scratch."""
    run = write_run(tmp_path / "run", data_dir, max_it=8, checkpoint_every=2, backup_every=2)
    assert trainer.main([run, "--exit-after", "6"]) == 0
    folder = tmp_path / "run"
    model_pt = folder / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[:5000])
    state = torch.load(folder / "model_6.pt", weights_only=True)
    next(v for v in state["decoder"].values() if v.is_floating_point()).view(-1)[0] += 1.0
    torch.save(state, folder / "model_6.pt")
    capsys.readouterr()
    assert trainer.main([run]) == 0
    out = capsys.readouterr().out
    assert f"'{model_pt}' is damaged" in out and f"'{folder / 'model_6.pt'}' is damaged" in out
    assert f"Resumed from {folder / 'model_4.pt'} at iteration 4" in out
    assert logged_its(str(folder))[-4:] == [5, 6, 7, 8]
    for name in os.listdir(folder):
        if name.endswith(".pt"):
            (folder / name).write_bytes(b"")
    assert trainer.main([run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: '{folder / 'model_8.pt'}' is empty (0 bytes), not a checkpoint. " \
        "Use another checkpoint of the run (model_best.pt, a model_<it>.pt backup) or the " \
        "original file."


# -- full and read-only disks -----------------------------------------------------------------

def test_a_full_disk_is_named_and_the_old_checkpoint_kept(good_checkpoint, monkeypatch):
    """/dev/full fails every write with ENOSPC, as a full disk does (torch.save reports it as a
    RuntimeError without errno)."""
    before = open(good_checkpoint, "rb").read()
    monkeypatch.setattr(checkpoint.tempfile, "mkstemp",
                        lambda **kw: (os.open("/dev/full", os.O_WRONLY), good_checkpoint + ".tmp"))
    with pytest.raises(CheckpointError, match="cannot write .*model.pt: the disk is full .*free.*needed"):
        save_checkpoint(good_checkpoint, OSRT(tiny_model_config()), it=4)
    assert open(good_checkpoint, "rb").read() == before


def test_a_read_only_disk_is_named(good_checkpoint, monkeypatch):
    def read_only(**kw):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointError, match="the file system is read-only. Choose a writable folder"):
        save_checkpoint(good_checkpoint, OSRT(tiny_model_config()), it=4)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MB file system (tmpfs), where the machine lets tests mount one (root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_training_on_a_real_full_disk_and_a_read_only_one(tmp_path, data_dir, small_tmpfs, capsys):
    run = write_run(tmp_path / "cfg", data_dir, max_it=2)
    (small_tmpfs / "filler").write_bytes(bytes(1000 << 10))       # leaves ~24 KB
    assert trainer.main([run, "--run-dir", str(small_tmpfs / "run")]) == 2
    assert "the disk is full" in capsys.readouterr().err
    (small_tmpfs / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    assert trainer.main([run, "--run-dir", str(small_tmpfs / "run")]) == 2
    assert "the file system is read-only" in capsys.readouterr().err


def test_evaluate_fails_when_a_metric_is_not_finite(tmp_path, data_dir, monkeypatch, capsys):
    import osrt_fast.evaluate as evaluate
    run = write_run(tmp_path / "run", data_dir, max_it=1)
    assert trainer.main([run]) == 0
    real = evaluate.evaluate
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: {**real(*a, **k), "psnr": float("nan")})
    assert evaluate.main([run]) == 1
    assert "the metrics ['psnr'] are not finite" in capsys.readouterr().err
