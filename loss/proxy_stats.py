"""Proxy selection statistics computed where the proxies live: each rank summarises its own block of classes
(counts, sums, a histogram of selection counts) and the parts are reduced; the proxy table is never gathered.

    stats = reduced_proxy_statistics(criterion)   # criterion.proxy_statistics(): collective; None if nothing selected
    summary, per_proxy, per_class = stats         # metrics `proxy/*` and two tables

The summary: `proxy/never_selected_share`, `proxy/class_never_selected_share`, `proxy/selection_gini` (Gini of
the counts), `proxy/selection_entropy` (of the selection shares, normalised by log C*N), `proxy/selections`,
`proxy/class_spread_mean` (mean pairwise cosine distance of a class's proxies, 0 for N = 1), `proxy/norm_mean`;
per_proxy (proxy, class, selection_count, norm), per_class (class, selection_count, proxies_selected, spread).
They equal a float64 computation over the full table (tests/loss/proxy_stats_reference.py) up to float rounding:
sums are reduced in float64, the Gini coefficient comes exactly from the merged histogram of counts. The 1-D
columns of the tables are gathered, 1/dim of the table's size.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from collectives import all_gather_object, all_gather_rows, all_reduce_, world

SUMS = ("rows", "classes", "never", "class_never", "selections", "c_log_c", "spread", "norm")


def block_statistics(counts: torch.Tensor, proxies: torch.Tensor, proxies_per_class: int) -> dict:
    """Partial statistics of one block of whole classes: counts (R,) int, proxies (R, dim) float, R = classes x N.

    Returns {"sums": float64 tensor (len(SUMS),), "hist": (values, frequencies) of the counts as int64 numpy,
    "counts" (R,) int64, "norm" (R,) float32, "class_counts" (c,), "proxies_selected" (c,), "spread" (c,)} on the
    CPU. Raises ValueError when R is not a multiple of N."""
    n, rows = int(proxies_per_class), counts.shape[0]
    if n < 1 or rows % n or proxies.shape[0] != rows:
        raise ValueError(f"proxy stats: {rows} counts, {proxies.shape[0]} proxies, proxies_per_class={n} do not "
                         f"fit together")
    c = rows // n
    with torch.no_grad():
        p = proxies.detach().float()
        norm = p.norm(dim=1)
        unit = F.normalize(p, dim=1, eps=1e-12).view(c, n, -1)
        if n > 1:
            cos = torch.einsum("cid,cjd->cij", unit, unit)
            spread = 1.0 - (cos.sum(dim=(1, 2)) - n) / (n * (n - 1))
        else:
            spread = torch.zeros(c, device=p.device)
        counts = counts.detach().long()
        by_class = counts.view(c, n)
        class_counts = by_class.sum(dim=1)
        cf = counts[counts > 0].double()
        sums = torch.stack([torch.tensor(float(rows)), torch.tensor(float(c)), (counts == 0).sum().double().cpu(),
                            (class_counts == 0).sum().double().cpu(), counts.sum().double().cpu(),
                            (cf * cf.log()).sum().cpu(), spread.double().sum().cpu(), norm.double().sum().cpu()])
        values, freq = torch.unique(counts, return_counts=True)
    return dict(sums=sums.double(), hist=(values.cpu().numpy(), freq.cpu().numpy()), counts=counts.cpu(),
                norm=norm.cpu(), class_counts=class_counts.cpu(), proxies_selected=(by_class > 0).sum(dim=1).cpu(),
                spread=spread.float().cpu())


def gini_from_histogram(values: np.ndarray, freq: np.ndarray) -> float:
    """Gini coefficient of non-negative integer counts given as (value, frequency) pairs (any order), exactly as
    of the sorted list: sum_i (2i - n - 1) x_i / (n sum x)."""
    order = np.argsort(values)
    xs, fs = [int(v) for v in np.asarray(values)[order]], [int(f) for f in np.asarray(freq)[order]]
    n, total, below, acc = sum(fs), sum(v * f for v, f in zip(xs, fs)), 0, 0
    if n == 0 or total == 0:
        return 0.0
    for v, h in zip(values, freq):  # positions below+1 .. below+h: sum of (2i - n - 1) = h (2 below + h - n)
        acc += v * h * (2 * below + h - n)
        below += h
    return acc / (n * total)


def summary_from(sums: np.ndarray, values: np.ndarray, freq: np.ndarray) -> dict[str, float]:
    """The `proxy/*` metrics from reduced sums (SUMS order) and the merged histogram of counts."""
    s = dict(zip(SUMS, (float(x) for x in sums)))
    rows, total = s["rows"], s["selections"]
    entropy = 0.0
    if rows > 1 and total:  # -(sum p log p) with p = c / T: log T - sum(c log c) / T
        entropy = (math.log(total) - s["c_log_c"] / total) / math.log(rows)
    return {
        "proxy/never_selected_share": s["never"] / rows,
        "proxy/class_never_selected_share": s["class_never"] / s["classes"],
        "proxy/selection_gini": gini_from_histogram(values, freq),
        "proxy/selection_entropy": entropy,
        "proxy/selections": total,
        "proxy/class_spread_mean": s["spread"] / s["classes"],
        "proxy/norm_mean": s["norm"] / rows,
    }


def _merge(hists) -> tuple[np.ndarray, np.ndarray]:
    values = np.concatenate([h[0] for h in hists]).astype(np.int64)
    freq = np.concatenate([h[1] for h in hists]).astype(np.int64)
    uniq, inverse = np.unique(values, return_inverse=True)
    return uniq, np.bincount(inverse, weights=freq, minlength=len(uniq)).astype(np.int64)


def reduced_proxy_statistics(criterion):
    """Collective for a ProxyGML form (loss.proxygml.ProxyGMLBase: one process, or those of loss.distributed;
    call on every rank; `criterion.proxy_statistics()` is this). (summary, per_proxy,
    per_class) as in the module docstring, or None when no proxy was selected since the counts were
    last reset. A class-sharded criterion summarises its own block and the parts are reduced (one all-reduce of
    len(SUMS) numbers, one all-gather of each rank's histogram of counts, the 1-D table columns gathered); a
    replicated one holds all proxies, with the selection counts of the global batch."""
    import pandas as pd

    sharded = criterion.local_rows() is not None
    counts = criterion.selection_counts if sharded else criterion.global_selection_counts()
    n = criterion.proxies_per_class
    part = block_statistics(counts, criterion.proxies, n)
    sums, hists = part["sums"], [part["hist"]]
    columns = {k: part[k] for k in ("counts", "norm", "class_counts", "proxies_selected", "spread")}
    group = criterion.group
    if sharded and world(group)[0] > 1:
        all_reduce_(sums, group=group)
        hists = all_gather_object(part["hist"], group=group)
        columns = {k: all_gather_rows(v, group)[0] for k, v in columns.items()}  # 1-D: no proxy table
    if sums[SUMS.index("selections")] == 0:
        return None
    summary = summary_from(sums.numpy(), *_merge(hists))
    cols = {k: v.numpy() for k, v in columns.items()}
    rows = len(cols["counts"])
    per_proxy = pd.DataFrame({"proxy": np.arange(rows), "class": np.arange(rows) // n,
                              "selection_count": cols["counts"], "norm": cols["norm"]})
    per_class = pd.DataFrame({"class": np.arange(rows // n), "selection_count": cols["class_counts"],
                              "proxies_selected": cols["proxies_selected"], "spread": cols["spread"]})
    return summary, per_proxy, per_class
