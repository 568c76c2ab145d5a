"""Real distributed training: train.py under torchrun, 2 processes, gloo on CPU.

One process is the reference: its run saves the parameters after every step (model_<it>.pt) and
logs loss and global gradient norm. Two processes with the same global batch must give the same
numbers within fp32 tolerance, under FSDP2 and DDP, and checkpoints must move between process
counts in both directions. (Adam hides a gradient scaled by a constant, so the logged gradient
norm is compared too: summing instead of averaging over processes shows there.)
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

import osrt_fast.trainer as trainer
from conftest import tiny_data_section, tiny_model_config
from osrt_fast import OSRT
from osrt_fast.checkpoint import load_checkpoint
from osrt_fast.data import ResumableBatchSampler

pytestmark = pytest.mark.slow      # left out by the quick run (pytest -m "not slow"); CI runs it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4




def write_run(folder, data_dir, model=None, **training):
    opts = {"batch_size": 4, "num_workers": 0, "print_every": 1, "visualize_every": 0,
            "validate_every": 0, "checkpoint_every": 0, "backup_every": 1, "max_it": STEPS,
            "lr_warmup": 0, "peak_lr": 1e-3, "eval_batch_size": 2, "vis_scenes": 2,
            "device": "cpu", "seed": 3}
    opts.update(training)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"data": tiny_data_section(data_dir), "model": model or tiny_model_config(),
                        "training": opts}, f)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun_command(config: str, *args: str, nproc: int = 2) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), os.path.join(ROOT, "train.py"), config, *args]


def torchrun(config: str, *args: str, nproc: int = 2, expect: int = 0) -> str:
    proc = subprocess.run(torchrun_command(config, *args, nproc=nproc), env=torchrun_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, f"torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def params(path):
    model = OSRT(tiny_model_config())
    load_checkpoint(path, model)
    return model.state_dict()


def train_log(folder):
    return {r["it"]: r for r in map(json.loads, open(os.path.join(folder, "log.jsonl")))
            if "loss" in r}


def assert_close_params(a_path, b_path, atol=2e-5):
    a, b = params(a_path), params(b_path)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, f"parameters differ by {worst}"


def assert_same_step(log_a, log_b, it):
    for key in ("loss", "grad_norm"):
        assert log_a[it][key] == pytest.approx(log_b[it][key], rel=1e-4), (key, it)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One process, STEPS steps, parameters after each step."""
    folder = str(tmp_path_factory.mktemp("one"))
    assert trainer.main([write_run(folder, data_dir), "--exit-after", str(STEPS)]) == 0
    return folder


def test_fsdp_two_processes_match_one_and_resume_in_one(tmp_path, data_dir, reference):
    # FSDP2 with every activation-checkpointing region on (recomputation changes nothing), with
    # evaluation and visualisation under sharding (every process takes part).
    fsdp = str(tmp_path / "fsdp")
    config = write_run(fsdp, data_dir, parallel="fsdp", validate_every=2, visualize_every=2,
                       activation_checkpointing={"encoder_blocks": True, "slot_attention": True,
                                                 "decoder_ray_chunk": 24})
    out = torchrun(config, "--exit-after", "2")
    assert "2 processes, FSDP" in out
    ref_log, log = train_log(reference), train_log(fsdp)
    # Steps 1 and 2 as one process: parameters (saved by the sharded run as whole tensors in
    # the single-process format), loss and global gradient norm.
    for it in (1, 2):
        assert_close_params(os.path.join(reference, f"model_{it}.pt"), os.path.join(fsdp, f"model_{it}.pt"))
        assert_same_step(ref_log, log, it)
    assert log[2]["world_size"] == 2 and log[2]["scenes_per_s"] > 0 and log[2]["tflops_per_s"] > 0
    evals = [json.loads(x) for x in open(os.path.join(fsdp, "log.jsonl")) if '"split"' in x]
    assert evals and evals[0]["num_scenes"] >= 2 and all(0 <= e["mse"] < 1 for e in evals)
    assert os.path.getsize(os.path.join(fsdp, "renders-val.png")) > 0
    # The checkpoint the two processes wrote (model.pt at step 2, with Adam's state) resumes in
    # one process and continues as the one-process run did.
    one = str(tmp_path / "then_one")
    os.makedirs(one)
    shutil.copy(os.path.join(fsdp, "model.pt"), os.path.join(one, "model.pt"))
    assert trainer.main([write_run(one, data_dir), "--exit-after", str(STEPS)]) == 0
    for it in (3, 4):
        assert_close_params(os.path.join(reference, f"model_{it}.pt"), os.path.join(one, f"model_{it}.pt"))
        assert_same_step(ref_log, train_log(one), it)


def test_sigterm_to_torchrun_saves_on_every_process(tmp_path, data_dir):
    """A cluster stops a job by SIGTERM to its launcher (Kubernetes: PID 1): torchrun passes it
    to both workers, which stop at the same step; the sharded model.pt holds that step and
    resumes in one process."""
    import signal
    import time
    folder = str(tmp_path / "run")
    config = write_run(folder, data_dir, parallel="fsdp", max_it=100000, backup_every=0)
    proc = subprocess.Popen(torchrun_command(config), env=torchrun_env(), cwd=ROOT, text=True,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(folder, "log.jsonl")) or len(train_log(folder)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert out.count("SIGTERM: stopping after this step") == 2, out[-4000:]
    last = max(train_log(folder))
    state = load_checkpoint(os.path.join(folder, "model.pt"), OSRT(tiny_model_config()))
    assert state["it"] == last, out[-4000:]
    assert trainer.main([write_run(folder, data_dir, max_it=last + 1, backup_every=0)]) == 0


def test_one_process_checkpoint_resumes_in_two_with_ddp(tmp_path, data_dir, reference):
    ddp = str(tmp_path / "ddp")
    config = write_run(ddp, data_dir, parallel="ddp")
    shutil.copy(os.path.join(reference, "model_2.pt"), os.path.join(ddp, "model.pt"))
    out = torchrun(config, "--exit-after", str(STEPS))
    assert "Resumed from" in out and "2 processes, DDP" in out
    ref_log, log = train_log(reference), train_log(ddp)
    for it in (3, 4):
        assert_close_params(os.path.join(reference, f"model_{it}.pt"), os.path.join(ddp, f"model_{it}.pt"))
        assert_same_step(ref_log, log, it)


def test_fsdp_checkpoint_resumes_in_fsdp(tmp_path, data_dir, reference):
    """A sharded run resumes a checkpoint (loading whole tensors into shards, Adam's state
    included) and continues as the one-process run."""
    fsdp = str(tmp_path / "fsdp")
    config = write_run(fsdp, data_dir, parallel="fsdp", grad_clip=1e9)
    shutil.copy(os.path.join(reference, "model_3.pt"), os.path.join(fsdp, "model.pt"))
    torchrun(config, "--exit-after", str(STEPS))
    assert_close_params(os.path.join(reference, "model_4.pt"), os.path.join(fsdp, "model_4.pt"))
    assert_same_step(train_log(reference), train_log(fsdp), 4)


def test_fsdp_with_compiled_triton_kernels(tmp_path, data_dir, reference):
    """The whole fast path under FSDP: the fused kernels (Triton's interpreter on the CPU) in
    compiled regions (inductor, fullgraph) inside FSDP units, every region checkpointed: the
    step of the eager one-process run."""
    fsdp = str(tmp_path / "fsdp_triton")
    config = write_run(fsdp, data_dir, model=tiny_model_config(backend="triton"), parallel="fsdp",
                       compile=True, activation_checkpointing={
                           "encoder_blocks": True, "slot_attention": True, "decoder_ray_chunk": 32})
    torchrun(config, "--exit-after", "1")
    assert_close_params(os.path.join(reference, "model_1.pt"), os.path.join(fsdp, "model_1.pt"))
    assert_same_step(train_log(reference), train_log(fsdp), 1)


def test_bad_data_stops_every_process_with_a_message(tmp_path):
    """The first process prepares the data; when it cannot, every process exits with a message
    (exit code 2) instead of the others waiting on it."""
    folder = str(tmp_path / "bad")
    config = write_run(folder, str(tmp_path / "nowhere"))
    with open(config) as f:
        cfg = yaml.safe_load(f)
    # A CLEVR3D folder without its metadata: a data error, found when the first process reads
    # it (a config error would stop every process at load, before any of them reads data).
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg["data"].update(dataset="clevr3d", path=str(empty), kwargs={})
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    out = torchrun(config, "--exit-after", "1", expect=1)
    # Both processes reached their error path (neither waits at a barrier) ...
    assert "metadata.npz' is missing" in out
    assert "another process could not load the data" in out
    # ... and the first to exit did so with the data-error code. torchrun's agent stops the
    # workers still running once one has failed, so the second exits with 2 or, if it was not
    # quick enough, with SIGTERM's -15; either way the run ended by itself (no timeout).
    root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", out, re.S)
    assert root and root.group(1) == "2", out[-3000:]
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", out)) <= {"2", "-15"}, out[-3000:]


def test_gradient_accumulation_is_the_same_global_batch(tmp_path, data_dir, reference):
    """One process, two micro-batches of 2 = one batch of 4 (and = two processes of 2)."""
    folder = str(tmp_path / "accum")
    assert trainer.main([write_run(folder, data_dir, grad_accum=2), "--exit-after", "2"]) == 0
    for it in (1, 2):
        assert_close_params(os.path.join(reference, f"model_{it}.pt"), os.path.join(folder, f"model_{it}.pt"))
        assert_same_step(train_log(reference), train_log(folder), it)


def test_sampler_splits_the_global_batch_by_position():
    one = ResumableBatchSampler(50, 8, seed=2)
    for it in (0, 5, 9):
        whole = one.batch(it)
        parts = [ResumableBatchSampler(50, 8, seed=2, rank=r, world_size=2, accum=2).batch(it, m)
                 for r in range(2) for m in range(2)]
        assert [p for part in parts for p in part] == whole
    # A stream of micro-batches: accum per step, resumable at a step.
    s = ResumableBatchSampler(50, 8, seed=2, world_size=2, rank=1, accum=2, start_it=3)
    stream = iter(s)
    assert [next(stream) for _ in range(2)] == [s.batch(3, 0), s.batch(3, 1)]
    with pytest.raises(ValueError, match="does not split"):
        ResumableBatchSampler(50, 6, seed=2, world_size=4)


def test_batch_that_does_not_split_is_a_clear_error(tmp_path, data_dir, capsys):
    config = write_run(str(tmp_path / "bad"), data_dir, batch_size=5, grad_accum=2)
    assert trainer.main([config, "--exit-after", "1"]) == 2
    err = capsys.readouterr().err
    assert "batch_size 5" in err and "divisible by 2" in err


def test_optimizer_state_index_and_name_forms_round_trip():
    from osrt_fast import parallel
    model = OSRT(tiny_model_config())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(1, 1, 3, 16, 16), torch.rand(1, 1, 3), torch.rand(1, 1, 16, 16, 3),
          torch.rand(1, 5, 3), torch.rand(1, 5, 3))[0].sum().backward()
    opt.step()
    sd = opt.state_dict()
    names = parallel.parameter_names(model)
    by_name = parallel.optimizer_state_by_name(sd, names)
    assert set(by_name["state"]) == set(names)
    back = parallel.optimizer_state_by_index(by_name, names)
    assert back["param_groups"] == sd["param_groups"]
    for i, v in sd["state"].items():
        assert all(torch.equal(v[k], back["state"][i][k]) for k in v)
    with pytest.raises(ValueError, match="parameters"):
        parallel.optimizer_state_by_name(sd, names[:-1])


def worker_pid(local_rank: int, marker: str):
    """The pid of the train.py worker with LOCAL_RANK `local_rank` whose command line holds
    `marker`, or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if "train.py" in cmdline and marker in cmdline and f"LOCAL_RANK={local_rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker to kill through /proc")
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_a_killed_worker_comes_back_on_the_first_restart_as_if_left_alone(tmp_path, data_dir,
                                                                          parallel):
    """Rank 1 SIGKILLed mid-run under `torchrun --max-restarts 1`: the job comes back on its first
    restart (each attempt's process group keys apart: parallel.attempt_store), resumes from the
    last checkpoint and ends with the weights of the same run left alone, bit for bit."""
    steps, every = 40, 10
    runs = {}
    for name in ("alone", "killed"):
        runs[name] = write_run(str(tmp_path / name), data_dir, parallel=parallel, max_it=steps,
                               checkpoint_every=every, backup_every=0, print_every=1)
    torchrun(runs["alone"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", os.path.join(ROOT, "train.py"), runs["killed"]]
    proc = subprocess.Popen(cmd, env=torchrun_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = os.path.join(os.path.dirname(runs["killed"]), "log.jsonl")
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            its = [r.get("it") for r in map(json.loads, open(log))] if os.path.exists(log) else []
            if any(it is not None and it >= every + 5 for it in its):
                pid = worker_pid(1, runs["killed"])
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed = max(i for i in its if i is not None)
            time.sleep(0.02)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None and killed < steps, "rank 1 was not killed mid-run"
    assert proc.returncode == 0, out[-6000:]
    resumed = [int(m) for m in re.findall(r"Resumed from \S+ at iteration (\d+)", out)]
    assert len(resumed) == 1 and resumed[0] % every == 0 and resumed[0] <= killed, out[-3000:]
    a, b = (params(os.path.join(os.path.dirname(runs[n]), "model.pt")) for n in ("alone", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_each_torchrun_attempt_keeps_its_process_group_keys_apart(monkeypatch):
    """What a restarted worker's process group writes into torchrun's store is under its attempt's
    prefix, so it never reads what a worker of an earlier attempt left; outside torchrun, torch's
    own env:// store."""
    from datetime import timedelta

    import torch.distributed as dist

    from osrt_fast.parallel import DistInfo, attempt_store
    for key in ("TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert attempt_store(DistInfo(0, 2, 0)) is None
    server = dist.TCPStore("127.0.0.1", 0, None, is_master=True, timeout=timedelta(seconds=30))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    for attempt in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        attempt_store(DistInfo(1, 2, 1)).set("default_pg/address", f"from attempt {attempt}")
    assert server.get("osrt_fast/attempt_0/default_pg/address") == b"from attempt 0"
    assert server.get("osrt_fast/attempt_1/default_pg/address") == b"from attempt 1"


def run_with_fault(config: str, **fault) -> subprocess.CompletedProcess:
    """torchrun, 2 processes, of tests/fixtures/faults/train_with_fault.py with the fault that
    the environment variables `fault` name."""
    cmd = torchrun_command(config)
    cmd[cmd.index(os.path.join(ROOT, "train.py"))] = os.path.join(
        ROOT, "tests", "fixtures", "faults", "train_with_fault.py")
    return subprocess.run(cmd, env=dict(torchrun_env(), **fault), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_a_non_finite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path, data_dir):
    """Rank 1 alone computes a NaN loss at step 3 (DDP): the mean loss every rank judges is NaN,
    so all skip that step together, the run goes on, and the replicas end identical."""
    config = write_run(str(tmp_path / "run"), data_dir, parallel="ddp", max_it=6, backup_every=0,
                       checkpoint_every=0)
    proc = run_with_fault(config, OSRT_TEST_NAN_RANK="1", OSRT_TEST_NAN_STEP="3")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert len(re.findall(r"non-finite loss .* at iteration 2", out)) == 2, out[-3000:]   # each rank
    assert sorted(train_log(os.path.dirname(config))) == [1, 2, 4, 5, 6]     # step 3 skipped
    run = os.path.dirname(config)
    a, b = (torch.load(os.path.join(run, f"params_rank{r}.pt")) for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_a_save_that_fails_on_the_writing_rank_stops_every_rank_and_keeps_the_checkpoint(
        tmp_path, data_dir, parallel):
    """Rank 0 (the one that writes) finds the disk full at the run's second save: no rank goes
    on, each ends with one clear message (exit 2), and model.pt is still the first save's."""
    config = write_run(str(tmp_path / "run"), data_dir, parallel=parallel, max_it=8,
                       checkpoint_every=3, backup_every=0)
    proc = run_with_fault(config, OSRT_TEST_FULL_DISK_RANK="0", OSRT_TEST_FULL_DISK_SAVE="2")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    run = os.path.dirname(config)
    errors = [x for x in out.splitlines() if x.startswith("error: ")]
    assert any("the disk is full" in x and "model.pt" in x for x in errors), out[-4000:]
    assert any("rank 0 could not write" in x for x in errors), out[-4000:]
    assert not re.search(r'File ".*osrt_fast', out), out[-4000:]      # no worker's traceback
    model = OSRT(tiny_model_config())
    assert load_checkpoint(os.path.join(run, "model.pt"), model)["it"] == 3
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]


def test_a_hung_rank_ends_the_job_with_a_message_and_it_resumes(tmp_path, data_dir):
    """Rank 1 stops answering in its 5th step's forward pass: rank 0 waits
    training.collective_timeout_s at the gradients' all-reduce, then ends the job with one line
    naming the wait and the rank behind; model.pt is the last good one (step 3), and the run
    resumes from it to its end."""
    config = write_run(str(tmp_path / "run"), data_dir, parallel="ddp", max_it=6, backup_every=0,
                       checkpoint_every=3, collective_timeout_s=8)
    proc = run_with_fault(config, OSRT_TEST_HANG_RANK="1", OSRT_TEST_HANG_STEP="5")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    errors = [x for x in out.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, out[-4000:]
    assert errors[0].startswith("error: rank 0 waited 8 s (training.collective_timeout_s)"), errors
    assert "Behind the others: rank 1 (step 5, in its forward pass)" in errors[0], errors
    assert not re.search(r'File ".*osrt_fast', out), out[-4000:]      # no worker's traceback
    run = os.path.dirname(config)
    assert load_checkpoint(os.path.join(run, "model.pt"), OSRT(tiny_model_config()))["it"] == 3
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]
    out = torchrun(config)
    assert "Resumed from" in out and "at iteration 3" in out and "Reached iteration 6" in out


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_a_run_resumes_in_another_number_of_processes(tmp_path, data_dir, parallel):
    """2 processes for two steps, then 3 from that checkpoint: steps 3 and 4 are the one-process
    run's (within fp32 tolerance), and every process's share of each global batch is the same
    scenes whatever the number of processes (none repeated, none skipped)."""
    one = str(tmp_path / "one")
    assert trainer.main([write_run(one, data_dir, batch_size=6), "--exit-after", "4"]) == 0
    run = str(tmp_path / "run")
    config = write_run(run, data_dir, batch_size=6, parallel=parallel)
    torchrun(config, "--exit-after", "2", nproc=2)
    out = torchrun(config, "--exit-after", "4", nproc=3)
    assert "Resumed from" in out and "at iteration 2" in out and "3 processes" in out, out[-3000:]
    for it in (3, 4):
        assert_close_params(os.path.join(one, f"model_{it}.pt"), os.path.join(run, f"model_{it}.pt"))
        assert_same_step(train_log(one), train_log(run), it)
    for it in range(2, 6):
        whole = ResumableBatchSampler(36, 6, seed=3).batch(it)
        for world in (2, 3):
            shares = [ResumableBatchSampler(36, 6, seed=3, rank=r, world_size=world).batch(it)
                      for r in range(world)]
            assert [i for share in shares for i in share] == whole


def test_the_soak_script_runs_and_its_table_is_current():
    """benchmarks/reliability/soak.py, small: a run interrupted twice ends as the run left alone;
    docs/reliability.md's soak table is the one the committed results give."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.reliability.soak", "--interruptions",
                           "2", "--steps", "30", "--no-save"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["final_exit"] == 0 and result["reached"] == 30
    assert result["max_abs_difference"] == 0.0 and sum(result["interruptions"].values()) >= 1
    from benchmarks.reliability.soak import RESULTS, TABLE_BEGIN, TABLE_END, table_text
    records = [json.loads(x) for x in open(RESULTS)] if os.path.exists(RESULTS) else []
    text = open(os.path.join(ROOT, "docs", "reliability.md")).read()
    written = text[text.index(TABLE_BEGIN) + len(TABLE_BEGIN):text.index(TABLE_END)]
    assert written == "\n" + table_text(records) + "\n", "run python -m benchmarks.reliability.soak --table"


def test_a_worker_killed_in_the_middle_of_a_save_comes_back_as_if_left_alone(tmp_path, data_dir):
    """Rank 0 SIGKILLed halfway through writing its second checkpoint (DDP, --max-restarts 1):
    model.pt is still the first save's, the restart removes the half-written file, resumes
    from it, and the run ends with the weights of the same run left alone."""
    runs = {name: write_run(str(tmp_path / name), data_dir, parallel="ddp", max_it=9,
                            checkpoint_every=3, backup_every=0) for name in ("alone", "killed")}
    torchrun(runs["alone"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", os.path.join(ROOT, "tests", "fixtures", "faults",
                                               "train_with_fault.py"), runs["killed"]]
    proc = subprocess.run(cmd, env=dict(torchrun_env(), OSRT_TEST_KILL_IN_SAVE="2"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "Removed temporary files of interrupted saves" in out, out[-3000:]
    assert re.search(r"Resumed from \S+ at iteration 3 ", out), out[-3000:]
    run = os.path.dirname(runs["killed"])
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]
    a, b = (params(os.path.join(os.path.dirname(runs[n]), "model.pt")) for n in ("alone", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
