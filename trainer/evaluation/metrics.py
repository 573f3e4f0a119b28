"""Retrieval and clustering metrics for metric learning, exact and chunked (never an N x N matrix).

Every sample is a query against all the others (leave-one-out: the query itself is never its own neighbour).
Embeddings are L2-normalised here, so "nearest" means highest cosine similarity; ties are broken by the
lower sample index, the same way on every backend, so the numbers do not depend on faiss or torch.

- Recall@K: share of queries with at least one sample of their class among their K nearest neighbours
  (K larger than N - 1 means all the others).
- MAP@R and R-precision (Musgrave et al., "A Metric Learning Reality Check", 2020): for a query whose class
  has R other samples, look at its R nearest neighbours; R-precision = (same-class among them) / R and
  MAP@R = (1/R) * sum over i <= R of precision@i * [neighbour i is of the query's class].
- NMI: k-means with k = number of classes in the set (20 iterations), then sklearn's
  normalized_mutual_info_score between the clusters and the labels.
- A class of a single sample: its query has no correct answer to find (R = 0), so it is left out of
  Recall@K, MAP@R and R-precision (as in pytorch-metric-learning), and its per-class values are NaN; it
  still takes part as a neighbour (a distractor) for every other query, and in NMI.

Backends: on a CUDA device the kNN (trainer.evaluation.knn) is torch matmul + top-k over query chunks and the
k-means is torch; elsewhere the kNN is faiss IndexFlatIP and the k-means faiss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score

from trainer.evaluation import knn

KMEANS_ITERS = 20


def compute_metrics(
    embeddings,
    labels,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    nmi: bool = True,
    map_r: bool = True,
    class_names=None,
    device=None,
    seed: int = 0,
    backend: str | None = None,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Metrics of one embedded test set on this process.

    embeddings: (N, D) float tensor or array; labels: (N,) ints (any class ids). class_names: a sequence
    indexed by class id or a mapping class id -> name. device: where the work runs (default: the tensor's
    device); CUDA uses torch, the CPU faiss. Returns ({"recall_at_K", "map_at_r", "r_precision", "nmi"},
    per-class DataFrame with columns class_name, recall_at_1, map_at_r, size, class_index).
    """
    device = _resolve_device(embeddings, device)
    x = _unit_embeddings(embeddings, device)
    class_ids, y = _class_indices(labels, len(x))
    ks = _check_ks(recall_ks)
    sizes = np.bincount(y)
    backend = backend or ("torch" if device.type == "cuda" else "faiss")

    others = sizes[y] - 1  # R: same-class samples besides the query
    k = min(max([1, *ks, int(others.max()) if map_r else 0]), len(x) - 1)
    with _ieee_fp32_matmul():
        hits, ap, rp = _retrieval(x, torch.as_tensor(y, device=x.device), others, ks, k, map_r, backend)

    valid = others > 0
    metrics = {f"recall_at_{K}": _mean(hits[valid, i + 1]) for i, K in enumerate(ks)}
    if map_r:
        metrics["map_at_r"] = _mean(ap[valid])
        metrics["r_precision"] = _mean(rp[valid])
    if nmi:
        with _ieee_fp32_matmul():
            clusters = kmeans(x, len(sizes), seed=seed, backend=backend)
        metrics["nmi"] = float(normalized_mutual_info_score(y, clusters))
    per_class = _per_class_table(class_ids, sizes, y, valid, hits[:, 0], ap if map_r else None, class_names)
    return metrics, per_class


# ---------------------------------------------------------------- input checks


def _resolve_device(embeddings, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return embeddings.device if isinstance(embeddings, torch.Tensor) else torch.device("cpu")


def _unit_embeddings(embeddings, device) -> torch.Tensor:
    if isinstance(embeddings, np.ndarray):  # any layout numpy allows (x[::-1] has negative strides)
        embeddings = np.ascontiguousarray(embeddings)
    x = torch.as_tensor(embeddings)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"embeddings must be (N >= 2, D) but have shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {x.dtype}")
    x = x.to(device=device, dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    return F.normalize(x, dim=1).contiguous()


def _class_indices(labels, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match embeddings, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    class_ids, y = np.unique(labels, return_inverse=True)
    return class_ids, y.reshape(-1).astype(np.int64)


def _check_ks(recall_ks) -> tuple[int, ...]:
    ks = tuple(int(k) for k in recall_ks)
    if any(k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"recall_ks must be distinct integers >= 1, got {list(recall_ks)}")
    return ks


@contextmanager
def _ieee_fp32_matmul():
    """Full float32 matmuls even where the trainer allows TF32 (10-bit mantissa) for speed.

    Sets and restores each backend's own `fp32_precision` (CUDA and the CPU's mkldnn): the global
    get_float32_matmul_precision() raises once they disagree, e.g. after the legacy
    `torch.backends.cuda.matmul.allow_tf32 = True` (seen with torch 2.11 on an H200)."""
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    previous = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, value in zip(backends, previous):
            b.fp32_precision = value


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


# ---------------------------------------------------------------- retrieval metrics


def _retrieval(x, y, others, ks, k, map_r, backend):
    """Per-query hits (N, 1 + len(ks)) for K = 1, *ks; AP@R (N,); R-precision (N,)."""
    n = len(x)
    hit_ks = (1, *ks)
    hits = np.zeros((n, len(hit_ks)), dtype=bool)
    ap = np.zeros(n)
    rp = np.zeros(n)
    r_all = torch.as_tensor(others, device=x.device)
    for start, _, idx in knn.nearest_neighbors(x, k, backend):
        rows = slice(start, start + len(idx))
        same = y[idx] == y[rows, None]
        for j, K in enumerate(hit_ks):
            hits[rows, j] = same[:, :K].any(1).cpu().numpy()
        if map_r:
            ap[rows], rp[rows] = (t.cpu().numpy() for t in _ap_and_rp_at_r(same, r_all[rows]))
    return hits, ap, rp


def _ap_and_rp_at_r(same: torch.Tensor, r: torch.Tensor):
    r_max = int(r.max()) if len(r) else 0
    if r_max == 0:
        zeros = torch.zeros(len(r), dtype=torch.float64, device=same.device)
        return zeros, zeros
    same = same[:, :r_max]
    ranks = torch.arange(1, r_max + 1, device=same.device)
    relevant = same & (ranks <= r[:, None])
    precision_at_i = relevant.cumsum(1).double() / ranks
    denom = r.clamp(min=1).double()
    ap = (precision_at_i * relevant).sum(1).double() / denom
    rp = relevant.sum(1).double() / denom
    return ap, rp


# ---------------------------------------------------------------- NMI


def kmeans(
    x: torch.Tensor, k: int, *, niter: int = KMEANS_ITERS, seed: int = 0, backend: str = "faiss"
) -> np.ndarray:
    """Cluster index of every row of x after `niter` Lloyd iterations with k centroids."""
    if backend == "faiss":
        import faiss

        xn = x.cpu().numpy()
        km = faiss.Kmeans(
            xn.shape[1], k, niter=niter, seed=seed, verbose=False,
            min_points_per_centroid=1, max_points_per_centroid=len(xn) // k + 1,
        )
        km.train(xn)
        return km.index.search(xn, 1)[1][:, 0]
    if backend == "torch":
        return _kmeans_torch(x, k, niter, seed).cpu().numpy()
    raise ValueError(f"backend must be 'faiss' or 'torch', got {backend!r}")


def _kmeans_torch(x, k, niter, seed):
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=g)[:k].to(x.device)].clone()
    for _ in range(niter):
        assign = _nearest_centroid(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0  # an empty cluster keeps its centroid
        centroids[filled] = sums[filled] / counts[filled, None]
    return _nearest_centroid(x, centroids)


def _nearest_centroid(x, centroids):
    half_sq = 0.5 * (centroids * centroids).sum(1)
    step = max(1, knn.SIM_BUDGET // len(centroids))
    return torch.cat([(x[s : s + step] @ centroids.T - half_sq).argmax(1) for s in range(0, len(x), step)])


# ---------------------------------------------------------------- per class


def _per_class_table(class_ids, sizes, y, valid, hit1, ap, class_names) -> pd.DataFrame:
    """Columns class_name, recall_at_1, map_at_r (when computed), size, class_index: what a reader looks for
    first leads (the MLflow UI shows a CSV's first columns)."""
    counted = np.bincount(y, weights=valid, minlength=len(sizes))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall1 = np.bincount(y, weights=hit1 & valid, minlength=len(sizes)) / counted
        table = {"class_name": _names(class_ids, class_names), "recall_at_1": np.where(counted > 0, recall1, np.nan)}
        if ap is not None:
            map_r = np.bincount(y, weights=ap * valid, minlength=len(sizes)) / counted
            table["map_at_r"] = np.where(counted > 0, map_r, np.nan)
        table.update(size=sizes, class_index=class_ids)
    return pd.DataFrame(table)


def _names(class_ids, class_names) -> list[str]:
    if class_names is None:
        return [str(c) for c in class_ids]
    names = []
    for c in class_ids:
        try:
            names.append(str(class_names[int(c)]))
        except (KeyError, IndexError):
            raise ValueError(f"class_names has no name for class id {int(c)}") from None
    return names
