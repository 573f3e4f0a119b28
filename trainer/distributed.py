"""Process-group setup: one process per device, launched by torchrun (or plain python for one process).

    env = setup("auto")      # reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from torchrun
    env.rank, env.world_size, env.local_rank, env.device, env.is_main
    ...
    teardown()

NCCL on CUDA devices, gloo on the CPU (`run.dist_backend` can ask for gloo on CUDA). A single process
without torchrun's variables still gets a (gloo or NCCL) group of one on a free local port, so the code below
it has one path.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


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
            raise RuntimeError("run.device: 'cuda' asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pick_backend(backend: str, dev: torch.device) -> str:
    """auto: NCCL on a CUDA device, gloo on the CPU. nccl on the CPU is refused here, before the group starts."""
    if backend == "auto":
        return "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise RuntimeError(f"run.dist_backend: 'nccl' needs a CUDA device, but the device is {str(dev)!r}")
    return backend


def setup(device: str = "auto", timeout_s: int = 1800, backend: str = "auto") -> DistEnv:
    """Join (or create) the default process group; idempotent. backend: auto | nccl | gloo (gloo also carries
    CUDA tensors, e.g. for two ranks sharing one GPU, which NCCL refuses)."""
    if "RANK" not in os.environ:  # plain `python -m trainer`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if not dist.is_initialized():
        backend = pick_backend(backend, dev)
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                                **kwargs)
    return DistEnv(rank, world_size, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (so all ranks stop at the same step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def any_ranks(flags, device: torch.device) -> list[bool]:
    """Each of `flags` (bools or 0-dim device tensors) made True on every rank if it is True on any rank.

    One all-reduce for all of them (the per-step stop check). With one rank it still reads tensors back (a sync)."""
    t = torch.stack([f.to(device=device, dtype=torch.float32).reshape(()) if torch.is_tensor(f)
                     else torch.tensor(1.0 if f else 0.0, device=device) for f in flags])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (pickled); the object itself with one rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart in the last training forward)."""
    if world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b, 0)
