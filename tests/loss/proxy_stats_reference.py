"""The reference for proxy-selection statistics: a plain float64 numpy computation over the full (C*N,) counts
and (C*N, dim) proxy table, written from the definitions (Gini, normalised entropy, never-selected shares, the
mean pairwise cosine distance of a class's proxies). loss/proxy_stats.py, which reduces per-rank blocks without
gathering the table, is checked against it."""
from __future__ import annotations

import math

import numpy as np


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 = all equal, -> 1 = all in one."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def proxy_statistics(counts: np.ndarray, proxies: np.ndarray, proxies_per_class: int):
    """Summaries (dict of metrics), a per-proxy and a per-class table of the proxy selection and spread.

    counts (C*N,) subgraph selections per proxy; proxies (C*N, dim), class-major (proxy j is class j // N).
    Spread of a class = mean pairwise cosine distance between its N proxies (0 when N = 1).
    """
    import pandas as pd

    counts = np.asarray(counts, dtype=np.int64)
    n = int(proxies_per_class)
    if n < 1 or len(counts) % n or proxies.shape[0] != len(counts):
        raise ValueError(f"proxy stats: {len(counts)} counts, {proxies.shape[0]} proxies, "
                         f"proxies_per_class={n} do not fit together")
    c = len(counts) // n
    total = int(counts.sum())
    p = counts / total if total else np.zeros(len(counts))
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum() / math.log(len(counts))) if len(counts) > 1 and total else 0.0
    unit = proxies / np.maximum(np.linalg.norm(proxies, axis=1, keepdims=True), 1e-12)
    by_class = unit.reshape(c, n, -1)
    if n > 1:
        cos = np.einsum("cid,cjd->cij", by_class, by_class)
        spread = 1.0 - (cos.sum(axis=(1, 2)) - n) / (n * (n - 1))
    else:
        spread = np.zeros(c)
    class_counts = counts.reshape(c, n).sum(axis=1)
    summary = {
        "proxy/never_selected_share": float((counts == 0).mean()),
        "proxy/class_never_selected_share": float((class_counts == 0).mean()),
        "proxy/selection_gini": gini(counts),
        "proxy/selection_entropy": entropy,
        "proxy/selections": float(total),
        "proxy/class_spread_mean": float(spread.mean()),
        "proxy/norm_mean": float(np.linalg.norm(proxies, axis=1).mean()),
    }
    per_proxy = pd.DataFrame({"proxy": np.arange(len(counts)), "class": np.arange(len(counts)) // n,
                              "selection_count": counts, "norm": np.linalg.norm(proxies, axis=1)})
    per_class = pd.DataFrame({"class": np.arange(c), "selection_count": class_counts,
                              "proxies_selected": (counts.reshape(c, n) > 0).sum(axis=1), "spread": spread})
    return summary, per_proxy, per_class
