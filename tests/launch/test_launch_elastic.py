"""The launch scripts driving the real trainer on 127.0.0.1 with gloo: two nodes, a killed worker, SIGTERM, a node
that never joins. Every job runs in its own session and is killed (by process group) if a test fails."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import free_port
from trainer.checkpoint import Checkpointer, load

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository
SINGLE = os.path.join(ROOT, "launch", "single_node.sh")
MULTI = os.path.join(ROOT, "launch", "multi_node.sh")
STEPS_PER_EPOCH = 14  # the digits demo: 901 training images (classes 0-4), global batch 64

pytestmark = pytest.mark.distributed


class Jobs:
    """Started launch scripts, each in its own session; anything still alive at teardown is killed."""

    def __init__(self, tmp_path):
        self.tmp, self.procs = tmp_path, []

    def start(self, name: str, cmd: list[str], **env) -> subprocess.Popen:
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env}
        environment = {k: v for k, v in environment.items() if v is not None}  # None: leave the variable unset
        with open(self.tmp / f"{name}.log", "w") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=self.tmp,
                                    start_new_session=True)
        proc.log_path = log.name
        self.procs.append(proc)
        return proc

    def close(self):
        for proc in self.procs:  # the whole session, also when its leader is gone (orphaned trainers)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait()


@pytest.fixture
def jobs(tmp_path):
    j = Jobs(tmp_path)
    yield j
    j.close()


def output(proc) -> str:
    with open(proc.log_path) as f:
        return f.read()


def finish(proc, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s; output:\n{output(proc)[-4000:]}")


def trainer_args(tmp_path, shards, name: str, **overrides) -> list[str]:
    """The demo preset (small CNN on 8x8 digits, CPU) on the shared shards, without evaluation before training."""
    values = {"run.output_dir": str(tmp_path / "runs"), "run.name": name, "data.root": shards,
              "run.device": "cpu", "eval.at_start": "false", "data.num_workers": 1, "tracking.enabled": "false",
              **overrides}
    return ["--config", "demo", *(f"{k}={v}" for k, v in values.items())]


def checkpoints(tmp_path, name: str) -> list[str]:
    """The complete checkpoints of run `name` (step-N/ DCP folders or step-N.pt files), oldest first."""
    return Checkpointer(str(tmp_path / "runs" / name / "checkpoints")).paths()


def load_all(paths: list[str]) -> list[dict]:
    """Every checkpoint loads completely and names its step in its file name."""
    states = []
    for path in paths:
        state = load(path)
        assert {"model", "optimizer", "criterion", "step", "epoch", "batch_in_epoch"} <= state.keys(), path
        assert re.search(rf"step-{state['step']:09d}(\.pt)?$", path), path
        states.append(state)
    return states


def wait_for(predicate, timeout: float, proc=None, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the job exited ({proc.returncode}) before {what}; output:\n{output(proc)[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def workers_of(pid: int) -> dict[int, int]:
    """{global rank: pid} of the trainer processes torchrun (pid) started, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                ppid = int(re.search(r"^PPid:\s+(\d+)", f.read(), re.M).group(1))
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, AttributeError):
            continue
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except OSError:
        return False


# --- a node that never joins ---------------------------------------------------------------------------------


def test_node_that_never_joins_times_out_with_an_explanation(jobs, tmp_path, shards):
    port = free_port()
    t0 = time.monotonic()
    node = jobs.start("lonely", [MULTI, "--endpoint", f"127.0.0.1:{port}", "--nnodes", "2", "--nproc-per-node",
                                 "1", "--join-timeout", "5", "--rdzv-id", "lonely", "--",
                                 *trainer_args(tmp_path, shards, "lonely")])
    rc = finish(node, timeout=90)
    took = time.monotonic() - t0
    out = output(node)
    assert rc == 1, out
    assert "timed out after --join-timeout 5 s: not all of --nnodes 2 nodes joined" in out
    assert f"127.0.0.1:{port}" in out and "Wait longer with --join-timeout SECONDS" in out
    assert "rdzv-conf" not in out and "join_timeout" not in out  # the launcher's option, not torchrun's
    assert "Traceback" not in out
    assert not checkpoints(tmp_path, "lonely")  # the trainer never started
    assert took < 60, f"took {took:.0f} s for a 5 s join timeout"


# --- what each node joined; a user error in the workers ---------------------------------------------------------


NODE_LINE = re.compile(r"launch: node (\d+) of (\d+) joined rendezvous (\S+) \(id '([^']+)'\): local ranks (\S+) = "
                       r"global ranks (\S+) of world size (\d+), OMP_NUM_THREADS=(\d+)")


def test_every_node_prints_what_it_joined_and_shares_the_cores(jobs, tmp_path):
    """Two nodes of one process each on this machine: each says its node rank, ranks, endpoint and world
    size; the launcher gives their workers the machine's CPUs split between them (OMP_NUM_THREADS unset)."""
    from launch.torchrun import usable_cpus

    port = free_port()
    args = [MULTI, "--endpoint", f"127.0.0.1:{port}", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-id", "lines", "--join-timeout", "60", "--", "--config", "demo", "--print-config"]
    nodes = [jobs.start(f"node{i}", args, OMP_NUM_THREADS=None) for i in range(2)]
    for node in nodes:
        assert finish(node, timeout=120) == 0, output(node)[-3000:]
    lines = [NODE_LINE.findall(output(node)) for node in nodes]
    assert [len(found) for found in lines] == [1, 1], [output(node)[-2000:] for node in nodes]
    (a,), (b,) = lines
    assert sorted([a[0], b[0]]) == ["0", "1"] and sorted([a[5], b[5]]) == ["0", "1"]
    for _, nnodes, endpoint, rdzv_id, local, _, world, omp in (a, b):
        assert (nnodes, endpoint, rdzv_id, local, world) == ("2", f"127.0.0.1:{port}", "lines", "0", "2")
        assert int(omp) == max(1, usable_cpus() // 2)  # 2 nodes x 1 process on this machine's CPUs


def test_user_error_in_the_workers_is_one_line_exit_2_and_no_restart(jobs, tmp_path, shards):
    job = jobs.start("bad", [SINGLE, *trainer_args(tmp_path, shards, "bad", **{"train.amp": "bogus"})],
                     NPROC_PER_NODE="2", MAX_RESTARTS="2")
    rc = finish(job, timeout=120)
    out = output(job)
    assert rc == 2, out
    assert "train.amp: 'bogus' is not one of" in out
    assert out.count("launch: the trainer refused its input") == 1, out
    assert out.count("launch: node 0 of 1 joined") == 1, out  # started once: a user error is not restarted
    assert "ChildFailedError" not in out and "Traceback" not in out and "exitcode" not in out, out
    assert not checkpoints(tmp_path, "bad")


# --- SIGTERM: checkpoint, then exit within 30 s --------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [
    # 1 worker: torchrun's killpg also reaches the loader workers, which must leave the signal to the trainer
    1,
    pytest.param(0, marks=pytest.mark.slow),
])
def test_sigterm_checkpoints_and_exits_within_30_s(jobs, tmp_path, shards, num_workers):
    job = jobs.start("term", [SINGLE, *trainer_args(tmp_path, shards, "term", **{
        "train.epochs": 50, "checkpoint.every_steps": 2, "data.num_workers": num_workers})],
        NPROC_PER_NODE="2")
    first = wait_for(lambda: checkpoints(tmp_path, "term"), 120, job, "the first checkpoint")
    ranks = wait_for(lambda: len(w := workers_of(job.pid)) == 2 and w, 10, job, "the two workers")
    time.sleep(0.5)  # well inside an epoch, between checkpoints
    t0 = time.time()
    os.kill(job.pid, signal.SIGTERM)
    rc = finish(job, timeout=30)
    out = output(job)
    assert rc == 128 + signal.SIGTERM, out
    assert "checkpoint saved" in out, out[-3000:]
    assert "DataLoader worker" not in out, out[-3000:]
    latest = checkpoints(tmp_path, "term")[-1]
    assert os.path.getmtime(latest) >= t0, "no checkpoint written after SIGTERM"
    (state,) = load_all([latest])
    assert state["step"] >= int(re.search(r"step-(\d+)", first[0]).group(1))
    assert state["world_size"] == 2
    assert not [pid for pid in ranks.values() if alive(pid)]
    assert not list((tmp_path / "runs" / "term" / "checkpoints").glob(".tmp-*"))


def test_a_launcher_killed_by_sigkill_leaves_no_trainer_training_on(jobs, tmp_path, shards):
    """torchrun itself SIGKILLed (the OOM killer, `kill -9`): the kernel sends its trainers SIGTERM
    (trainer.errors.stop_with_launcher), so they checkpoint and exit instead of training on as orphans."""
    job = jobs.start("orphan", [SINGLE, *trainer_args(tmp_path, shards, "orphan", **{
        "train.epochs": 50, "checkpoint.every_steps": 2})], NPROC_PER_NODE="2")
    wait_for(lambda: checkpoints(tmp_path, "orphan"), 120, job, "the first checkpoint")
    ranks = wait_for(lambda: len(w := workers_of(job.pid)) == 2 and w, 10, job, "the two workers")
    time.sleep(0.5)
    t0 = time.time()
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    wait_for(lambda: not [pid for pid in ranks.values() if alive(pid)], 30, None, "the trainers to exit")
    latest = checkpoints(tmp_path, "orphan")[-1]
    assert os.path.getmtime(latest) >= t0, "no checkpoint written after the launcher died"
    (state,) = load_all([latest])
    assert state["world_size"] == 2
    assert "checkpoint saved" in output(job)


def test_a_launcher_killed_while_its_trainers_start_leaves_none_running(jobs, tmp_path, shards):
    """Killed before the trainers have asked to follow it (they are still importing): each one notices at that
    request that its launcher is gone (launch/torchrun.py hands them its pid) and stops, instead of training."""
    job = jobs.start("early", [SINGLE, *trainer_args(tmp_path, shards, "early", **{"train.epochs": 50})],
                     NPROC_PER_NODE="2")
    ranks = wait_for(lambda: len(w := workers_of(job.pid)) == 2 and w, 60, job, "the two workers")
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    wait_for(lambda: not [pid for pid in ranks.values() if alive(pid)], 30, None, "the trainers to exit")
    assert "run early finished" not in output(job)


# --- two nodes, c10d rendezvous ------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_nodes_train_and_evaluate_together(jobs, tmp_path, shards):
    port = free_port()
    args = [MULTI, "--endpoint", f"127.0.0.1:{port}", "--nnodes", "2", "--nproc-per-node", "1",
            "--max-restarts", "0", "--rdzv-id", "two-nodes", "--join-timeout", "120", "--",
            *trainer_args(tmp_path, shards, "two", **{"train.epochs": 2, "eval.every_epochs": 1})]
    nodes = [jobs.start(f"node{i}", args) for i in range(2)]
    for node in nodes:
        assert finish(node, timeout=300) == 0, output(node)[-4000:]
    outs = [output(node) for node in nodes]
    joined = [NODE_LINE.search(out).groups() for out in outs]
    assert sorted(j[0] for j in joined) == ["0", "1"] and all(j[1] == j[6] == "2" for j in joined)
    evals = [re.findall(r"\[eval epoch (\d+)\] recall_at_1 ([\d.]+)", out) for out in outs]
    assert sorted(len(e) for e in evals) == [0, 2]  # rank 0 (on one of the nodes) reports both evaluations
    recall = float(max(evals, key=len)[-1][1])
    assert recall > 0.5  # digits 5-9 retrieved by a net trained on 0-4: far above chance (~0.2)
    (state,) = load_all(checkpoints(tmp_path, "two")[-1:])
    assert state["world_size"] == 2 and state["step"] == 2 * STEPS_PER_EPOCH and state["epoch"] == 2


# --- a worker SIGKILLed mid-epoch under --max-restarts 1 ------------------------------------------------------


@pytest.mark.slow
def test_killed_worker_restarts_and_resumes_from_the_latest_checkpoint(jobs, tmp_path, shards):
    import mlflow
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    epochs = 3
    job = jobs.start("kill", [SINGLE, *trainer_args(tmp_path, shards, "kill", **{
        "train.epochs": epochs, "eval.every_epochs": epochs, "checkpoint.every_steps": 5,
        "checkpoint.keep_last": 20, "tracking.enabled": "true", "tracking.tracking_uri": uri,
        "tracking.experiment": "launch", "tracking.log_every_steps": 1, "train.log_every_steps": 1})],
        NPROC_PER_NODE="2", MAX_RESTARTS="1", LOGLEVEL="INFO")
    wait_for(lambda: any(re.search(r"step-000000010(\.pt)?$", p) for p in checkpoints(tmp_path, "kill")), 180, job,
             "the step-10 checkpoint")
    victim = workers_of(job.pid)[1]
    os.kill(victim, signal.SIGKILL)
    assert finish(job, timeout=300) == 0, output(job)[-4000:]
    out = output(job)
    assert "restart_count=1" in out
    resumed = re.search(r"resumed from \S+step-(\d+)(?:\.pt)?: epoch 0, batch (\d+), step (\d+)", out)
    assert resumed, out[-4000:]
    step = int(resumed.group(3))
    assert 10 <= step < STEPS_PER_EPOCH and int(resumed.group(2)) == step  # mid-epoch 0
    states = load_all(checkpoints(tmp_path, "kill"))
    assert states[-1]["step"] == epochs * STEPS_PER_EPOCH  # the step count went on, not from 0
    assert [s["step"] for s in states] == sorted({s["step"] for s in states})
    assert not list((tmp_path / "runs" / "kill" / "checkpoints").glob(".tmp-*"))

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("launch").experiment_id])
    assert len(runs) == 1, "the restarted job opened a second MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED" and {s["tracker_run_ids"]["mlflow"] for s in states} == {run.info.run_id}
    logged = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert logged == list(range(1, epochs * STEPS_PER_EPOCH + 1))  # every step, before and after the restart


# --- the SLURM batch script's preemption path ----------------------------------------------------------------

SLURM_SHIMS = {
    # Stand-ins for the SLURM commands the batch script calls; the job itself (torchrun + trainer) is real (a real
    # two-node cluster runs the same script in tests/launch/test_slurm_cluster.py). srun notes the step's pid,
    # which `scancel --signal=SIG JOB` signals.
    "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\necho $$ > "$SHIM_LOG.step"\n'
            'exec "$@"\n',
    "scancel": '#!/usr/bin/env bash\nkill -"${1#--signal=}" "$(cat "$SHIM_LOG.step")"\n',
    "scontrol": '#!/usr/bin/env bash\ncase "$1 $2" in\n  "show hostnames") echo 127.0.0.1 ;;\n'
                '  requeue*) echo "requeue $2" >> "$SHIM_LOG" ;;\nesac\n',
}


@pytest.mark.slow  # the stand-in; the real SLURM cluster runs this path in the services tests
def test_slurm_usr1_before_the_time_limit_checkpoints_and_requeues(jobs, tmp_path, shards):
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    for name, text in SLURM_SHIMS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    shim_log = tmp_path / "slurm-calls.log"
    args = trainer_args(tmp_path, shards, "unused", **{"train.epochs": 50, "checkpoint.every_steps": 2,
                                                       "data.num_workers": 0})
    args.remove("run.name=unused")  # the batch script names the run <job name>-<job id>
    job = jobs.start("sbatch", ["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), *args],
                     PATH=f"{bin_dir}:{os.environ['PATH']}", SHIM_LOG=str(shim_log), PROXYGML_ROOT=ROOT,
                     SLURM_JOB_ID="4242", SLURM_JOB_NAME="pgml", SLURM_JOB_NUM_NODES="1",
                     SLURM_JOB_NODELIST="localhost", NPROC_PER_NODE="1", RDZV_PORT=str(free_port()))
    wait_for(lambda: checkpoints(tmp_path, "pgml-4242"), 120, job, "the first checkpoint")
    t0 = time.time()
    os.kill(job.pid, signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` does
    rc = finish(job, timeout=30)
    out = output(job)
    assert rc == 128 + signal.SIGTERM, out[-3000:]  # the step was stopped with SIGTERM
    assert "got USR1" in out and "checkpoint saved" in out
    latest = checkpoints(tmp_path, "pgml-4242")[-1]
    assert os.path.getmtime(latest) >= t0
    load_all([latest])
    assert shim_log.read_text().split() == ["requeue", "4242"]
