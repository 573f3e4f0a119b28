"""launch/slurm.sbatch submitted unmodified to a real two-node SLURM cluster on this machine (launch/local_cluster.sh):
the paths a cluster user hits. The demo trains over 2 nodes x 1 rank (gloo on the CPU), as the user would start it:
sbatch options and environment variables only.

- submit: the job ends with the same final metrics and step count as the same run under torchrun --nnodes 2;
- time limit (--signal=B:USR1@60, --time=2): checkpoint, requeue, resume, the same final metrics and step count
  (the step is held with SIGSTOP at epoch 2 until SLURM's warning comes, so that the short demo is mid-run then);
- preemption (scontrol requeue of a running job): the same;
- scancel mid-run: every process of the job ends within KillWait, with a checkpoint or a line in the job log;
- a node's task SIGKILLed: the job ends in bounded time (srun --kill-on-bad-exit), never at the time limit;
- a user error (a bad config key): one line in the job log, exit status 2, no requeue.

Each test prints one `slurm path:` line (what it measured); `pytest -s` shows them. No process of a job may be
left on either node at its end (the tasks, torchrun, the trainers and their loader workers carry SLURM_JOB_ID).
"""
from __future__ import annotations

import contextlib
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

from tests.launch.slurm_cluster import Cluster

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
pytestmark = [pytest.mark.services, pytest.mark.distributed]

EPOCHS = 8  # each test acts at epoch 2 (the job log, polled, lags the training by a second or two)
# A CNN 4x the demo's width: the demo itself runs 112 steps in under 5 s on 2 idle cores, over before a signal
# sent at "epoch 2" lands; at width 128 it is about 20 s. No periodic checkpoint: a resume starts from the stop's.
TRAIN = ["--config", "demo", f"train.epochs={EPOCHS}", f"eval.every_epochs={EPOCHS}", "eval.at_start=false",
         f"checkpoint.every_epochs={EPOCHS}", "model.small_cnn_width=128"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final(run_dir: str) -> tuple[dict, int]:
    """The run's last evaluation (metrics, step) from its summary.json."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        last = json.load(f)["evaluations"][-1]
    return last["metrics"], last["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training under two `launch/multi_node.sh` (torchrun --nnodes 2) on 127.0.0.1, without SLURM."""
    out = str(tmp_path_factory.mktemp("torchrun-reference"))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    cmd = [os.path.join(ROOT, "launch", "multi_node.sh"), "--endpoint", f"127.0.0.1:{port}", "--nnodes", "2",
           "--nproc-per-node", "1", "--rdzv-id", "reference", "--join-timeout", "120", "--",
           *TRAIN, f"run.output_dir={out}", "run.name=reference"]
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(os.path.join(out, f"node{i}.log"), "w")) for i in range(2)]
        nodes = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                 for log in logs]
        try:
            codes = [p.wait(timeout=600) for p in nodes]
        finally:
            for p in nodes:
                if p.poll() is None:
                    os.killpg(p.pid, 9)
                    p.wait()
    with open(os.path.join(out, "node0.log")) as f:
        assert codes == [0, 0], f.read()[-3000:]
    return final(os.path.join(out, "reference"))


def assert_same_training(run_dir: str, reference) -> None:
    metrics, step = final(run_dir)
    ref_metrics, ref_step = reference
    assert step == ref_step == EPOCHS * 14  # 901 train images, batch 64 over 2 ranks: 14 steps per epoch
    assert metrics == pytest.approx(ref_metrics, abs=1e-9), (metrics, ref_metrics)


def report(path: str, what: str, result: str, seconds: float | None, left: int) -> None:
    took = f"{seconds:.0f} s" if seconds is not None else "-"
    print(f"\nslurm path: {path} | {what} | {result} | {took} | processes left {left}", file=sys.stderr)


@pytest.mark.timeout(300)
def test_submit_trains_like_torchrun(cluster: Cluster, reference, tmp_path):
    job = cluster.submit(tmp_path, TRAIN)
    state = cluster.wait_done(job, timeout=240)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", cluster.log(tmp_path)
    assert state["Restarts"] == "0"
    assert_same_training(cluster.run_dir(tmp_path, job), reference)
    left = cluster.job_processes(job)
    assert not left, left
    report("submit", "sbatch --nodes 2 (NPROC_PER_NODE=1), demo", "same metrics and steps as torchrun", None,
           len(left))


def hold(cluster: Cluster, job: str) -> list[int]:
    """SIGSTOP to the job's trainers (and their loader workers): on a fast machine the demo would end before a
    signal sent now arrives; the signal sent next (scancel's or requeue's SIGTERM) then finds them mid-run. Not
    through SLURM (`scancel --signal=STOP` marks the job STOPPED, and a STOPPED job is not cancelled)."""
    pids = [int(line.split()[0]) for line in cluster.job_processes(job)
            if " -m trainer" in line and "torch.distributed.run" not in line and "launch.torchrun" not in line]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    return pids


def release(pids: list[int]) -> None:
    """SIGCONT to the held trainers: the SIGTERM that waited for them is handled now."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.mark.timeout(600)
def test_time_limit_checkpoints_requeues_and_resumes(cluster: Cluster, reference, tmp_path):
    """SLURM's own warning (--signal=B:USR1@60 with --time=2 comes 30-60 s after the start): the training step is
    held (SIGSTOP) at epoch 2 until it comes, so that the short demo is mid-run then, as a long job would be."""
    job = cluster.submit(tmp_path, TRAIN, sbatch=["--time=2", "--signal=B:USR1@60"])
    held = cluster.wait_training(tmp_path, job, epoch=2, or_line="got USR1")
    if held:
        subprocess.run(["scancel", "--signal=STOP", job], env=cluster.env, check=True, timeout=30)
    cluster.wait_line(tmp_path, "got USR1", timeout=120)
    if held:
        subprocess.run(["scancel", "--signal=CONT", job], env=cluster.env, check=True, timeout=30)
    state = cluster.wait_done(job, timeout=540)
    log = cluster.log(tmp_path)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-4000:]
    assert int(state["Restarts"]) >= 1
    stops = re.findall(r"stopped at epoch \d+ batch \d+ \(step (\d+)\)(?: by [^;]+)?; checkpoint saved", log)
    resumes = re.findall(r"resumed from \S+: epoch \d+, batch \d+, step (\d+)", log)
    assert stops and int(stops[0]) > 0, log[-4000:]
    assert stops[0] in resumes, (stops, resumes)  # the requeued job went on from the stop's checkpoint
    assert_same_training(cluster.run_dir(tmp_path, job), reference)
    assert len(set(re.findall(r"MLflow run (\w+)", log))) == 1  # one MLflow run across the restarts
    left = cluster.job_processes(job)
    assert not left, left
    report("time limit", f"--time=2 --signal=B:USR1@60, {state['Restarts']} requeue(s), stopped at step "
           f"{stops[0]}", "resumed, same metrics and steps", cluster.resume_gap(job), len(left))


@pytest.mark.timeout(400)
def test_scontrol_requeue_resumes(cluster: Cluster, reference, tmp_path):
    job = cluster.submit(tmp_path, TRAIN)
    cluster.wait_training(tmp_path, job, epoch=2)
    held = hold(cluster, job)  # the short demo stays mid-run however fast the machine is
    subprocess.run(["scontrol", "requeue", job], env=cluster.env, check=True, timeout=30)
    time.sleep(1)  # the step's SIGTERM reaches torchrun and is forwarded to the held trainers
    release(held)
    state = cluster.wait_done(job, timeout=360)
    log = cluster.log(tmp_path)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-4000:]
    assert state["Restarts"] == "1"
    stops = re.findall(r"stopped at epoch \d+ batch \d+ \(step (\d+)\)(?: by [^;]+)?; checkpoint saved", log)
    resumes = re.findall(r"resumed from \S+: epoch \d+, batch \d+, step (\d+)", log)
    assert stops and stops[0] in resumes, log[-4000:]
    assert_same_training(cluster.run_dir(tmp_path, job), reference)
    left = cluster.job_processes(job)
    assert not left, left
    report("requeue", f"scontrol requeue at epoch 2, stopped at step {stops[0]}", "resumed, same metrics and steps",
           cluster.resume_gap(job), len(left))


@pytest.mark.timeout(300)
def test_scancel_stops_every_process_with_a_checkpoint(cluster: Cluster, tmp_path):
    job = cluster.submit(tmp_path, TRAIN)
    cluster.wait_training(tmp_path, job, epoch=2)
    assert cluster.job_processes(job)  # the tasks, torchrun, the trainers and their loader workers
    held = hold(cluster, job)  # the short demo stays mid-run however fast the machine is
    t0 = time.monotonic()
    subprocess.run(["scancel", job], env=cluster.env, check=True, timeout=30)
    time.sleep(1)  # the step's SIGTERM reaches torchrun and is forwarded to the held trainers
    release(held)
    gone = cluster.wait_no_processes(job, timeout=cluster.kill_wait + 30)
    took = time.monotonic() - t0
    state = cluster.wait_done(job, timeout=60)
    log = cluster.log(tmp_path)
    assert gone, cluster.job_processes(job)
    assert state["JobState"] == "CANCELLED", state
    assert took < cluster.kill_wait, f"{took:.0f} s: the job's processes outlived SIGTERM until SIGKILL"
    saved = re.search(r"stopped at epoch \d+ batch \d+ \(step (\d+)\)(?: by [^;]+)?; checkpoint saved", log)
    assert saved, log[-4000:]
    run_dir = cluster.run_dir(tmp_path, job)
    assert os.path.exists(os.path.join(run_dir, "checkpoints", f"step-{int(saved.group(1)):09d}"))
    report("scancel", "scancel at epoch 2", f"checkpoint at step {saved.group(1)}, CANCELLED", took, 0)


@pytest.mark.timeout(300)
def test_lost_node_ends_the_job_in_bounded_time(cluster: Cluster, tmp_path):
    job = cluster.submit(tmp_path, TRAIN, sbatch=["--time=10"])  # MAX_RESTARTS: the default (3)
    cluster.wait_training(tmp_path, job, epoch=2)
    task = cluster.task_pid(job, node="n2")  # the node's torchrun (multi_node.sh execs it)
    t0 = time.monotonic()
    os.kill(task, 9)
    state = cluster.wait_done(job, timeout=120)
    gone = cluster.wait_no_processes(job, timeout=60)
    took = time.monotonic() - t0
    assert state["JobState"] == "FAILED" and state["ExitCode"] != "0:0", state
    assert gone, cluster.job_processes(job)
    assert took < 120
    report("node lost", "SIGKILL of n2's task (torchrun) at epoch 2", f"job {state['JobState']} "
           f"(exit {state['ExitCode']}), no requeue", took, 0)


@pytest.mark.timeout(180)
def test_user_error_is_one_line_exit_2_and_no_requeue(cluster: Cluster, tmp_path):
    t0 = time.monotonic()
    job = cluster.submit(tmp_path, ["--config", "demo", "train.epochz=3"])
    state = cluster.wait_done(job, timeout=150)
    took = time.monotonic() - t0
    log = cluster.log(tmp_path)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", (state, log[-3000:])
    assert state["Restarts"] == "0"
    errors = [line for line in log.splitlines() if "train.epochz" in line]
    assert len(errors) == 1, log
    assert "Traceback" not in log
    time.sleep(3)
    assert cluster.state(job)["JobState"] == "FAILED"  # and it stays so: not requeued
    left = cluster.job_processes(job)
    assert not left, left
    report("user error", "train.epochz=3", f"exit 2, one line: {errors[0].strip()[:80]}", took, len(left))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_job_runs_in_the_image(cluster: Cluster, tmp_path):
    """The same job with CONTAINER= set to podman (as the sbatch header documents Apptainer): each node's launcher
    runs inside the image (launch/build_image.sh builds it; PROXYGML_IMAGE names another)."""
    image = os.environ.get("PROXYGML_IMAGE", "localhost/proxygml:debian")
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman not installed (apt-get install podman runc)")
    if subprocess.run([podman, "image", "exists", image], capture_output=True).returncode != 0:
        pytest.skip(f"image {image} not built (launch/build_image.sh)")
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chmod(runs, 0o777)  # the image's user (uid 1000) writes there
    conf = tmp_path / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    # --pid host: the "nodes" share one host name here, so their launchers must not share a pid (the rendezvous
    # tells nodes apart so); torchrun is then no container's pid 1 either, so signals reach it (else: --init)
    label = f"proxygml.test={tmp_path.name}"
    container = (f"{podman} --runtime runc --cgroup-manager cgroupfs run --rm --pid host --network host "
                 f"--label {label} --volume {runs}:/runs --entrypoint env {image}")
    t0 = time.monotonic()
    job = cluster.submit(tmp_path, ["--config", "demo", "train.epochs=2", "run.output_dir=/runs"],
                         env={"CONTAINER": container, "PROXYGML_ROOT": "/opt/proxygml",
                              "CONTAINERS_CONF": str(conf)}, output_dir=None)
    try:
        state = cluster.wait_done(job, timeout=500)
    finally:  # a container the job's end did not stop (its podman client killed) is removed here
        penv = dict(os.environ, CONTAINERS_CONF=str(conf))
        pods = subprocess.run([podman, "ps", "-q", "--filter", f"label={label}"], capture_output=True, text=True,
                              env=penv).stdout.split()
        for pod in pods:
            subprocess.run([podman, "rm", "-f", pod], capture_output=True, env=penv)
    took = time.monotonic() - t0
    log = cluster.log(tmp_path)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-4000:]
    assert not pods, f"containers left running after the job: {pods}"
    metrics, step = final(str(runs / f"proxygml-{job}"))
    assert step == 28 and metrics["recall_at_1"] > 0.5
    left = cluster.job_processes(job)
    assert not left, left
    report("job in image", f"CONTAINER=podman run {image}, demo 2 epochs", f"COMPLETED, R@1 "
           f"{metrics['recall_at_1']:.4f}", took, len(left) + len(pods))
