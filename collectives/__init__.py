"""The collective toolbox: every cross-rank operation of the project, written once (loss/, trainer/, evaluation).

Every function is a no-op (or the identity) without an initialised process group or with one rank, so callers
have one code path. Each is collective: every rank of ``group`` (default: the world) must call it, in the
same order.

    size, rank = world()                     # (1, 0) without a process group
    rows, sizes = all_gather_rows(t)         # uneven first dims; with_grad=True lets gradients flow back
    flags = any_ranks([stop, diverged], device)
    obj = broadcast_object(obj)              # rank 0's object on every rank
    objs = all_gather_object(obj)            # one per rank, in rank order
    set_phase("step 12")                     # what this rank does now (named when a peer waits on it too long)
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

_PHASE = ["start-up"]


def set_phase(text: str) -> None:
    """Record what this rank is doing (`step 12`, `evaluation after epoch 3`, `checkpoint at step 40`): a plain
    assignment, no communication; trainer/distributed.py's heartbeat publishes it, so that a rank that waited
    past the collective timeout can name the rank that stopped answering and what it was doing."""
    _PHASE[0] = text


def phase() -> str:
    return _PHASE[0]


def is_distributed() -> bool:
    """True when a process group is initialised (it may still have one rank)."""
    return dist.is_available() and dist.is_initialized()


def world(group=None) -> tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) without an initialised process group."""
    if not is_distributed():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def rank(group=None) -> int:
    return world(group)[1]


def block(total: int, size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous block when ``total`` items are split as evenly as possible."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def comm_device(device: torch.device | None = None) -> torch.device:
    """Where tensors must live for the default group's backend: the current CUDA device under NCCL, else the
    CPU (gloo carries CPU tensors; ``device`` is ignored then)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(t: Tensor, group=None, with_grad: bool = False) -> tuple[Tensor, list[int]]:
    """Every rank's ``t`` concatenated along dim 0 in rank order (first dims may differ), and the per-rank
    row counts. Rows are padded to the largest count for the collective and cut back. With ``with_grad``
    gradients flow back to each rank's share (``torch.distributed.nn.functional.all_gather``: each rank's rows
    get the sum of all ranks' gradients)."""
    size, _ = world(group)
    if size == 1:
        return t, [t.shape[0]]
    n = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n, group=group)
    sizes = [int(s) for s in torch.cat(counts).tolist()]
    padded = F.pad(t, (0, 0) * (t.dim() - 1) + (0, max(sizes) - t.shape[0]))
    if with_grad:
        from torch.distributed.nn.functional import all_gather as all_gather_with_grad

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = all_gather_with_grad(padded.contiguous(), group=group)
    else:
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sizes


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce_(t: Tensor, op: str = "sum", group=None) -> Tensor:
    """In place: ``t`` reduced over the ranks of ``group`` by ``op`` ("sum", "max" or "min"); returns ``t``."""
    if world(group)[0] > 1:
        dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    return t


def all_gather_tensors(t: Tensor, group=None) -> list[Tensor]:
    """Every rank's ``t`` (the same shape on every rank), in rank order; ``[t]`` with one rank."""
    size, _ = world(group)
    if size == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def broadcast_(t: Tensor, src: int, group=None) -> Tensor:
    """In place: rank ``src`` of ``group``'s ``t`` on every rank of it (``src`` is the rank within the group)."""
    if world(group)[0] > 1:
        dist.broadcast(t, dist.get_global_rank(group, src) if group is not None else src, group=group)
    return t


def barrier() -> None:
    if world()[0] > 1:
        dist.barrier()


def any_ranks(flags, device: torch.device) -> list[bool]:
    """Each of ``flags`` (bools or 0-dim device tensors) made True on every rank if it is True on any rank.

    One all-reduce for all of them (the per-step stop check). With one rank it still reads tensors back (a sync)."""
    t = torch.stack([f.to(device=device, dtype=torch.float32).reshape(()) if torch.is_tensor(f)
                     else torch.tensor(1.0 if f else 0.0, device=device) for f in flags])
    all_reduce_(t, op="max")
    return [v > 0 for v in t.tolist()]


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (pickled); the object itself with one rank."""
    if world()[0] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj, group=None) -> list:
    """Every rank's (picklable) ``obj``, in rank order; ``[obj]`` with one rank."""
    size, _ = world(group)
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart in the last training forward)."""
    if world()[0] > 1:
        for b in module.buffers():
            dist.broadcast(b, 0)
