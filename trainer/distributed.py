"""Process-group setup: one process per device, launched by torchrun (or plain python for one process).

    env = setup("auto")      # reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from torchrun
    env.rank, env.world_size, env.local_rank, env.device, env.is_main
    ...
    teardown()

NCCL on CUDA devices, gloo on the CPU (`run.dist_backend` can ask for gloo on CUDA). A single process
without torchrun's variables still gets a (gloo or NCCL) group of one on a free local port, so the code below
it has one path. The collectives themselves are in `collectives/` (one toolbox for every room).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trainer.errors import UserError


class DeviceError(UserError, RuntimeError):
    """run.device / run.dist_backend ask for what this machine does not have (a user error: exit 2, one line)."""


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceError("run.device: 'cuda' asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pick_backend(backend: str, dev: torch.device) -> str:
    """auto: NCCL on a CUDA device, gloo on the CPU. nccl on the CPU is refused here, before the group starts."""
    if backend == "auto":
        return "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise DeviceError(f"run.dist_backend: 'nccl' needs a CUDA device, but the device is {str(dev)!r}")
    return backend


def cpu_threads(environ=os.environ) -> int | None:
    """Intra-op threads for a CPU rank, or None to leave torch's choice: this machine's CPUs shared by the
    processes a launcher started on it (LOCAL_WORLD_SIZE from torchrun, LOCAL_SIZE from DeepSpeed's launcher),
    unless the user set OMP_NUM_THREADS. torchrun sets it (1) itself; DeepSpeed's launcher does not, and every
    rank then uses every core (several times slower from the oversubscription)."""
    if "OMP_NUM_THREADS" in environ:
        return None
    local = int(environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or 1)
    if local <= 1:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // local)


def setup(device: str = "auto", timeout_s: int = 1800, backend: str = "auto") -> DistEnv:
    """Join (or create) the default process group; idempotent. backend: auto | nccl | gloo (gloo also carries
    CUDA tensors, e.g. for two ranks sharing one GPU, which NCCL refuses)."""
    if "RANK" not in os.environ:  # plain `python -m trainer`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    threads = cpu_threads() if dev.type == "cpu" else None
    if threads is not None:
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        backend = pick_backend(backend, dev)
        kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                                **kwargs)
        if world_size > 1:
            Heartbeat.start(rank)
    return DistEnv(rank, world_size, local_rank, dev)


def teardown() -> None:
    Heartbeat.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------ naming the rank a collective waited on

HEARTBEAT_S = 1.0  # how often each rank publishes its beat and phase
HEARTBEAT_KEY = "proxygml/heartbeat/{rank}"
STORE_WAIT_S = 5.0  # how long the diagnosis waits for the rendezvous store


def _store_client(timeout_s: float):
    """A client of the job's rendezvous store of its own (torchrun's agent or rank 0 hosts it)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


class Heartbeat:
    """A daemon thread that publishes, every HEARTBEAT_S, `<beat>|<host>|<pid>|<phase>` of this rank in the
    rendezvous store (the phase: collectives.phase()): a rank whose beat stops advancing has stopped running
    (SIGSTOP, frozen, gone)."""

    _thread: threading.Thread | None = None
    _stop = threading.Event()

    @classmethod
    def start(cls, rank: int) -> None:
        if cls._thread is not None:
            return
        cls._stop.clear()
        cls._thread = threading.Thread(target=cls._run, args=(rank,), name="heartbeat", daemon=True)
        cls._thread.start()

    @classmethod
    def stop(cls) -> None:
        cls._stop.set()
        cls._thread = None

    @classmethod
    def _run(cls, rank: int) -> None:
        from collectives import phase
        try:
            store = _store_client(STORE_WAIT_S)
            beat = 0
            while not cls._stop.is_set():
                store.set(HEARTBEAT_KEY.format(rank=rank), f"{beat}|{socket.gethostname()}|{os.getpid()}|{phase()}")
                beat += 1
                cls._stop.wait(HEARTBEAT_S)
        except Exception:  # noqa: BLE001 - no store (it went with its host): nothing to publish to
            return


def _end_frozen(beats) -> None:
    """SIGKILL frozen ranks on this host: a stopped process cannot take the launcher's SIGTERM, and torchrun would
    wait 30 s more for it before its own SIGKILL; the job is ending either way."""
    import signal
    for _, _, host, pid in beats:
        if host == socket.gethostname() and pid > 0:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    frozen = f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")  # stopped, or traced
                if frozen:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def describe_stall(timeout_s: int) -> str:
    """One line: which rank stopped answering and what it was doing, from the heartbeats of every rank (read
    twice, 2.5 beats apart: a beat that does not advance is a process that does not run)."""
    from collectives import phase
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    waited = f"rank {rank} waited at {phase()} for run.collective_timeout_s={timeout_s} s"

    def read(store) -> dict[int, tuple[int, str, str, int]]:
        out = {}
        for r in range(world_size):
            try:
                beat, host, pid, what = store.get(HEARTBEAT_KEY.format(rank=r)).decode().split("|", 3)
                out[r] = (int(beat), what, host, int(pid))
            except Exception:  # noqa: BLE001 - no beat yet, or the store gave up
                out[r] = (-1, "start-up", "", 0)
        return out

    try:
        Heartbeat.stop()  # this rank's own beat is of no use now
        store = _store_client(STORE_WAIT_S)
        first = read(store)
        time.sleep(2.5 * HEARTBEAT_S)
        second = read(store)
    except Exception:  # noqa: BLE001 - the store's host itself stopped answering
        return (f"the job's rendezvous store stopped answering ({os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')}: rank 0, or the launcher, is stopped or gone); {waited}")
    stopped = [r for r in range(world_size) if r != rank and second[r][0] == first[r][0]]
    behind = [r for r in range(world_size) if r != rank and second[r][1] != phase()]
    if stopped:
        _end_frozen([second[r] for r in stopped])
        return "; ".join(f"rank {r} stopped answering (its process no longer runs: stopped, frozen or gone); it "
                         f"was at {second[r][1]}" for r in stopped) + f"; {waited}. Look at that rank's machine, " \
                         "or raise run.collective_timeout_s if its work is only slow"
    if behind:
        return "; ".join(f"rank {r} is running but stuck at {second[r][1]}" for r in behind) + f"; {waited}. " \
               "Raise run.collective_timeout_s if that work is only slow"
    return (f"a collective timed out with every rank running at {phase()}; {waited}. The network between the "
            f"ranks may have failed")
