"""The collective pieces of the class-sharded loss: the exact global top-k over proxy blocks (candidates, then a
bisection on (similarity, -global index) keys with all-reduced counts), the sharded log-sum-exp with its local
backward, and the gradient scale that keeps DDP's average a sum."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from collectives import all_gather_tensors, all_reduce_, world


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` (so that DDP's average keeps the sum)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class ShardedLogSumExp(torch.autograd.Function):
    """Row-wise log-sum-exp over the pieces of all ranks (-inf entries take no part); local backward.

    Rows must have at least one finite entry on some rank.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, group):
        size, _ = world(group)
        local_max = logits.max(dim=1).values
        shift = torch.where(torch.isfinite(local_max), local_max, torch.zeros_like(local_max))
        local_sum = (logits - shift[:, None]).exp().sum(dim=1)
        mine = torch.stack([local_max, local_sum])
        parts = all_gather_tensors(mine, group)
        maxes, sums = torch.stack(parts).unbind(dim=1)  # (W, M) each
        top = maxes.max(dim=0).values
        lse = top + (sums * (maxes - top).exp()).sum(dim=0).log()
        ctx.save_for_backward(logits, lse)
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        logits, lse = ctx.saved_tensors
        return (logits - lse[:, None]).exp() * grad[:, None], None


def order_keys(vals: Tensor, global_idx: Tensor) -> Tensor:
    """int64 keys ordered like (float32 value descending... as a number, then global index ascending)."""
    bits = (vals.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    value_key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotonic in the float value
    return value_key * (1 << 32) + ((1 << 32) - 1 - global_idx)


@torch.no_grad()
def sharded_topk(scores: Tensor, need: int, offset: int, group=None,
                 candidates: int | None = None) -> tuple[Tensor, Tensor]:
    """This rank's share of each row's global top-``need`` by (score, lower global index first).

    ``scores`` (M, K_r) are this rank's columns, global index ``offset + j``. Returns (idx, mask), both
    (M, kk); mask marks the local indices that are in the global top-need. Each rank first keeps
    kk = ``candidates`` (default: need) local candidates per row; if some rank's list turns out too short
    for the threshold found (all ranks agree on that), the selection is redone with kk = min(need, K_r).
    """
    full = min(need, scores.shape[1])
    if candidates is None or world(group)[0] == 1:
        return _topk_from_candidates(scores, full, need, offset, group)[:2]
    idx, mask, complete = _topk_from_candidates(scores, max(1, min(full, candidates)), need, offset, group)
    flag = complete.all().to(torch.int64).reshape(1)
    all_reduce_(flag, op="min", group=group)
    if bool(flag.item()):
        return idx, mask
    return _topk_from_candidates(scores, full, need, offset, group)[:2]


def _topk_from_candidates(scores: Tensor, kk: int, need: int, offset: int, group):
    """(idx, mask, complete): the selection from kk local candidates per row; complete marks the rows whose
    candidates hold every local entry that can reach the threshold found (then the selection is exact)."""
    cols = scores.shape[1]
    vals, idx = scores.topk(min(kk + 1, cols), dim=1)
    if vals.shape[1] > kk:  # a tie across the cut: take those rows by a stable sort (lower index first)
        straddle = (vals[:, kk - 1] == vals[:, kk]).nonzero()[:, 0]
        vals, idx = vals[:, :kk].clone(), idx[:, :kk].clone()
        if straddle.numel():
            sv, si = scores[straddle].sort(dim=1, descending=True, stable=True)
            vals[straddle], idx[straddle] = sv[:, :kk], si[:, :kk]
    keys = order_keys(vals, idx + offset)
    ascending = keys.sort(dim=1).values
    # the float value first (32 rounds); the global index only when a tie at the threshold must be split
    value_keys = ascending >> 32
    value = _bisect(value_keys, kk, need, -(1 << 31), 1 << 31, 32, group)
    complete = (value_keys[:, 0] < value) | (kk == cols)  # entries left out are below the threshold value
    at_least = _count_at_least(value_keys, kk, value)
    all_reduce_(at_least, group=group)
    if bool((at_least == need).all()):  # the same answer on every rank: no index rounds anywhere
        return idx, ((keys >> 32) >= value[:, None]) & torch.isfinite(vals), complete
    lo = _bisect(ascending, kk, need, value * (1 << 32), (value + 1) * (1 << 32), 32, group)
    return idx, (keys >= lo[:, None]) & torch.isfinite(vals), complete


def _count_at_least(ascending: Tensor, kk: int, t: Tensor) -> Tensor:
    return kk - torch.searchsorted(ascending, t[:, None], side="left")[:, 0]


def _bisect(ascending: Tensor, kk: int, need: int, lo, hi, rounds: int, group) -> Tensor:
    """Per row the largest t in [lo, hi) with #(entries >= t) >= need over all ranks.

    Needs #(>= lo) >= need > #(>= hi) and hi - lo <= 2**rounds; one all-reduce of M counts per round.
    """
    rows = ascending.shape[0]
    lo = torch.as_tensor(lo, dtype=torch.long, device=ascending.device).expand(rows).clone()
    hi = torch.as_tensor(hi, dtype=torch.long, device=ascending.device).expand(rows).clone()
    for _ in range(rounds):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        count = _count_at_least(ascending, kk, mid)
        all_reduce_(count, group=group)
        ok = count >= need
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo
