"""A two-node SLURM cluster on this machine for the tests (launch/local_cluster.sh), and what the tests ask of it:
submit launch/slurm.sbatch as a user would, read a job's state, find its processes on the nodes.

One cluster per test session, in a fixed folder: `up` at the start first stops whatever a killed earlier session
left there (by its pid files and the processes started with its SLURM_CONF); a finalizer and an atexit hook run
`down` at the end, also when a test fails or times out.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "launch", "local_cluster.sh")
SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")
DEFAULT_DIR = os.path.join(tempfile.gettempdir(), f"proxygml-slurm-tests-{os.getuid()}")


def missing() -> str | None:
    """Why the cluster cannot start here (a skip reason), or None."""
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol"):
        if shutil.which(tool) is None:
            return f"{tool} not found: apt-get install slurm-wlm munge (.ci/services/slurm.sh)"
    if os.getuid() != 0:
        return "the local SLURM cluster runs its daemons as root (SlurmdUser=root)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, directory: str = DEFAULT_DIR):
        self.dir = directory
        self.conf = os.path.join(directory, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.kill_wait = 30  # KillWait in local_cluster.sh: SIGTERM to SIGKILL when a job is cancelled
        self._history: dict[str, list[tuple[float, str]]] = {}

    # --- the daemons ---
    def up(self) -> None:
        self.down()  # what a killed earlier session left behind
        atexit.register(self.down)
        r = subprocess.run([SCRIPT, "up", self.dir], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            self.down()
            raise RuntimeError(f"local_cluster.sh up failed:\n{r.stdout}{r.stderr}")

    def down(self) -> None:
        if os.path.isdir(self.dir):
            subprocess.run([SCRIPT, "down", self.dir], capture_output=True, timeout=120)

    # --- jobs ---
    def submit(self, tmp_path, trainer_args: list[str], sbatch: list[str] = (), env: dict | None = None,
               output_dir: str | None = "runs") -> str:
        """`sbatch` of launch/slurm.sbatch from the repository root, its log in tmp_path/job.log; returns the id."""
        job_env = dict(self.env, NPROC_PER_NODE="1", RDZV_PORT=str(free_port()), PYTHONPATH=ROOT, **(env or {}))
        args = list(trainer_args)
        if output_dir is not None:
            args.append(f"run.output_dir={tmp_path / output_dir}")
        cmd = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
               f"--output={tmp_path / 'job.log'}", *sbatch, SBATCH, *args]
        r = subprocess.run(cmd, cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=60, check=True)
        job = r.stdout.strip().split(";")[0]
        self._history[job] = []
        return job

    def state(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        r = subprocess.run(["scontrol", "show", "job", "-o", job], env=self.env, capture_output=True, text=True,
                           timeout=30)
        fields = dict(re.findall(r"(\w+)=(\S*)", r.stdout))
        if job in self._history and fields.get("JobState"):
            seen = self._history[job]
            if not seen or seen[-1][1] != fields["JobState"]:
                seen.append((time.monotonic(), fields["JobState"]))
        return fields

    def wait_done(self, job: str, timeout: float) -> dict[str, str]:
        """Poll until the job has ended for good (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.state(job)
            if s.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                     "BOOT_FAIL", "DEADLINE"):
                return s
            time.sleep(1)
        raise TimeoutError(f"job {job} still {self.state(job).get('JobState')} after {timeout} s")

    def resume_gap(self, job: str) -> float | None:
        """Seconds from the first time the job left RUNNING (requeued) to its next RUNNING, as polled."""
        seen = self._history.get(job, [])
        for i, (t, s) in enumerate(seen):
            if s != "RUNNING" and any(p == "RUNNING" for _, p in seen[:i]):
                later = [u for u, p in seen[i:] if p == "RUNNING"]
                return later[0] - t if later else None
        return None

    def log(self, tmp_path) -> str:
        path = tmp_path / "job.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def run_dir(self, tmp_path, job: str) -> str:
        return str(tmp_path / "runs" / f"proxygml-{job}")

    def wait_training(self, tmp_path, job: str, epoch: int, timeout: float = 240, or_line: str | None = None) -> bool:
        """Until the job log shows the progress bar of `epoch` (0-based): the job is mid-training. True then;
        False if `or_line` showed up first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.state(job)
            log = self.log(tmp_path)
            if re.search(rf"epoch {epoch}: +\d+%", log):
                return True
            if or_line and or_line in log:
                return False
            time.sleep(0.5)
        raise TimeoutError(f"job {job} did not reach epoch {epoch} in {timeout} s:\n{self.log(tmp_path)[-3000:]}")

    def wait_line(self, tmp_path, line: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if line in self.log(tmp_path):
                return
            time.sleep(0.5)
        raise TimeoutError(f"no {line!r} in the job log after {timeout} s:\n{self.log(tmp_path)[-3000:]}")

    # --- processes on the nodes ---
    def job_processes(self, job: str) -> list[str]:
        """'pid node cmdline' of every live process (not a zombie) started for `job` by this cluster."""
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if env.get(b"SLURM_JOB_ID") == job.encode() and env.get(b"SLURM_CONF") == self.conf.encode():
                out.append(f"{pid} {env.get(b'SLURMD_NODENAME', b'?').decode()} {cmd[:150]}")
        return out

    def wait_no_processes(self, job: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.job_processes(job):
                return True
            time.sleep(0.5)
        return False

    def task_pid(self, job: str, node: str) -> int:
        """The pid of the job step's task on `node` (the per-node launcher, torchrun)."""
        for line in self.job_processes(job):
            pid, where, cmd = line.split(" ", 2)
            if where == node and "launch.torchrun" in cmd:
                return int(pid)
        raise LookupError(f"no torchrun of job {job} on {node}: {self.job_processes(job)}")


def stop_on_sigterm() -> None:
    """A SIGTERM to the test session (CI's timeout) ends it like Ctrl-C, so the finalizers stop the cluster."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, handler)
