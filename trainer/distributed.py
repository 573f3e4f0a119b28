"""Process-group setup: one process per device, launched by torchrun (or plain python for one process).

    env = setup("auto")      # reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from torchrun
    env.rank, env.world_size, env.local_rank, env.device, env.is_main
    ...
    teardown()

NCCL on CUDA devices, gloo on the CPU (`run.dist_backend` can ask for gloo on CUDA). A single process
without torchrun's variables still gets a (gloo or NCCL) group of one on a free local port, so the code below
it has one path. The collectives themselves are in `loss/collectives.py` (one toolbox for every room).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

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
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                                **kwargs)
    return DistEnv(rank, world_size, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
