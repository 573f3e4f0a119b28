"""The one nearest-neighbour search of the project: exact cosine top-k over unit vectors, chunked (never an
N x N matrix), ties broken by the lower sample index on every backend (torch matmul + top-k, or faiss).

    for start, sims, idx in nearest_neighbors(x, k, backend="faiss"):   # every row a query, leave-one-out
        ...
    sims, idx = neighbors_of(x, rows, k)                               # just these query rows

Used by the metrics (trainer.evaluation.metrics) and the tracker's retrieval grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

QUERY_CHUNK = 4096  # queries per kNN step
SIM_BUDGET = 2**28  # most similarity entries held at once (1 GiB of float32)


def nearest_neighbors(
    x: torch.Tensor, k: int, backend: str = "faiss"
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (first query row, sims (B, k), indices (B, k)) over query chunks of the unit vectors x.

    Leave-one-out, sorted by similarity then by index. Memory: one query chunk at a time.
    """
    n = len(x)
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} samples, got {k}")
    if backend == "faiss":
        chunks = _faiss_candidates(x, k)
    elif backend == "torch":
        chunks = _torch_candidates(x, k)
    else:
        raise ValueError(f"backend must be 'faiss' or 'torch', got {backend!r}")
    for start, sims, idx in chunks:
        yield start, *_exact_top_k(x, start, sims, idx, k)


def neighbors_of(x: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sims (Q, k), indices (Q, k)) of the query rows `rows` of the unit vectors x: leave-one-out, sorted by
    similarity then by index, exactly as nearest_neighbors ranks them (whole similarity rows, torch)."""
    n = len(x)
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} samples, got {k}")
    rows = torch.as_tensor(rows, dtype=torch.int64, device=x.device)
    sims = torch.empty(len(rows), k, dtype=x.dtype, device=x.device)
    idx = torch.empty(len(rows), k, dtype=torch.int64, device=x.device)
    group = max(1, SIM_BUDGET // (4 * n))  # rows computed at once (sims + int32 ranks)
    for g in torch.arange(len(rows), device=x.device).split(group):
        sims[g], idx[g] = _full_rows_top_k(x, rows[g], k)
    return _sort_by_sim_then_index(sims, idx)


def _torch_candidates(x: torch.Tensor, k: int):
    """k + 1 non-self candidates per query (fewer only when N - 1 is smaller), any order among ties."""
    n = len(x)
    m = min(k + 1, n - 1)
    step = max(1, min(QUERY_CHUNK, SIM_BUDGET // n))
    for start in range(0, n, step):
        rows = torch.arange(start, min(start + step, n), device=x.device)
        sims = x[rows] @ x.T
        sims[torch.arange(len(rows), device=x.device), rows] = -math.inf
        top = sims.topk(m, dim=1)
        yield start, top.values, top.indices


def _faiss_candidates(x: torch.Tensor, k: int):
    import faiss

    xn = x.cpu().numpy()
    n = len(xn)
    index = faiss.IndexFlatIP(xn.shape[1])
    index.add(xn)
    m = min(k + 1, n - 1)
    for start in range(0, n, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, n)
        d, i = index.search(xn[start:stop], m + 1)  # one more to drop the query itself
        sims, idx = torch.from_numpy(d), torch.from_numpy(i)
        is_self = idx == torch.arange(start, stop)[:, None]
        order = torch.argsort(is_self.to(torch.int8), dim=1, stable=True)[:, :m]  # self (if found) last
        yield start, sims.gather(1, order).to(x.device), idx.gather(1, order).to(x.device)


def _exact_top_k(x, start, sims, idx, k):
    """Canonical top-k from sorted candidates: rows tied at the k-th place are recomputed in full."""
    if sims.shape[1] > k:
        tied = (sims[:, k - 1] == sims[:, k]).nonzero().flatten()
        sims, idx = sims[:, :k].clone(), idx[:, :k].clone()
        group = max(1, SIM_BUDGET // (4 * len(x)))  # rows recomputed at once (sims + int32 ranks)
        for g in tied.split(group):
            sims[g], idx[g] = _full_rows_top_k(x, g + start, k)
    return _sort_by_sim_then_index(sims, idx)


def _full_rows_top_k(x, rows, k):
    """Top-k of whole similarity rows, ties at the boundary going to the lower index."""
    sims = x[rows] @ x.T
    sims[torch.arange(len(rows), device=x.device), rows] = -math.inf
    kth = sims.topk(k, dim=1).values[:, -1:]
    above = sims > kth
    at = sims == kth
    room = k - above.sum(1, keepdim=True)
    chosen = above | (at & (at.cumsum(1, dtype=torch.int32) <= room))
    idx = chosen.nonzero()[:, 1].view(len(rows), k)
    return sims.gather(1, idx), idx


def _sort_by_sim_then_index(sims, idx):
    by_index = idx.argsort(dim=1)
    sims, idx = sims.gather(1, by_index), idx.gather(1, by_index)
    by_sim = sims.argsort(dim=1, descending=True, stable=True)
    return sims.gather(1, by_sim), idx.gather(1, by_sim)
