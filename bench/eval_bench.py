"""Evaluation cost: trainer.evaluation.metrics.compute_metrics against the plain baseline, in the same run.

Baseline (the authors' CUB/Cars evaluation): the full N x N similarity matrix and its top-k (torch), MAP@R
from the same matrix, NMI from sklearn KMeans (n_init=1, max_iter=20, the same iteration count as ours).
Ours: chunked exact kNN (faiss IndexFlatIP on the CPU), faiss k-means, never an N x N matrix.

Each measurement runs in its own process, so "peak" is that process's peak resident memory (Python, torch
and the embeddings included). Data: random clustered unit vectors (class centres + noise) with the test
set's shape; timing does not depend on the values.

    python bench/eval_bench.py                    # CUB-size and Cars-size vs baseline, then SOP size (ours)
    python bench/eval_bench.py --skip-sop         # just the comparison
    python bench/eval_bench.py --only-sop --device cuda --forward-backbone resnet50   # the GPU targets

On CUDA (`--device cuda`, SOP size only) the kNN is torch matmul + top-k and the k-means torch, timed after a
warm-up on 4% of the classes (CUDA context, cuBLAS handles); the target is under 1 s. `--forward-backbone` also times
the embedder's bf16 inference forward (random init, batch 256, synthetic tensors on the device, channels_last)
and estimates the whole SOP evaluation as 60,502 forward passes at that rate + the metric step (target: under
10 s; image loading and decoding are not in the estimate). `--size tiny` swaps the SOP size for a smoke-test
size (500 x 25 classes) with the same output.

Measured 2026-11-27 on the 2-core dev CPU while other jobs ran (load average 15-21, so wall times are
stretched several-fold; CPU seconds are the stable figure):

      set                           code      wall s   CPU s   peak GiB   Recall@1 / MAP@R
      CUB size   5,924 x 100 cls    baseline   55.1    13.1    1.09       0.8937 / 0.2802
                                    ours       36.1     5.1    0.99       same (max diff 8e-8)
      Cars size  8,131 x 98 cls     baseline  141.3    18.8    1.24       0.9094 / 0.2764
                                    ours       38.0     5.4    1.04       same (max diff 6e-8)
      SOP size  60,502 x 11,316     ours      471/673  116.6/116.2  1.86/1.76  0.1214 / 0.0401
        (K up to 1000, MAP@R, NMI with 20 iterations; of the CPU time the k=1000 kNN is 75 s)

116 CPU-seconds is ~60 s of wall time on the two cores when they are free: inside 2 min / 4 GB.
Re-measured on the idle machine (load average 1.0), `--only-sop`: 51.8 s wall, 100.2 s CPU, peak 1.62 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # name: (N, classes, recall ks)
    "cub": (5924, 100, (1, 2, 4, 8)),
    "cars": (8131, 98, (1, 2, 4, 8)),
    "sop": (60502, 11316, (1, 10, 100, 1000)),
    "tiny": (500, 25, (1, 2, 4, 8)),  # a smoke test of the script, not a benchmark
}


def clustered(n: int, classes: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(classes), rng.integers(0, classes, n - classes)])  # every class >= 1
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    x = centres[labels] + 3.0 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def baseline(x, labels, ks, seed=0):
    """The plain evaluation: full similarity matrix, sklearn KMeans."""
    import torch
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    xt, y = torch.from_numpy(x), torch.from_numpy(labels)
    sims = xt @ xt.T
    sims.fill_diagonal_(-float("inf"))
    sizes = torch.bincount(y)
    r = sizes[y] - 1
    top = sims.topk(max(max(ks), int(r.max())), dim=1).indices
    same = y[top] == y[:, None]
    valid = r > 0
    out = {f"recall_at_{k}": same[valid, :k].any(1).double().mean().item() for k in ks}
    rel = same[:, : int(r.max())] & (torch.arange(1, int(r.max()) + 1) <= r[:, None])
    precision = rel.cumsum(1).double() / torch.arange(1, rel.shape[1] + 1)
    rv = r[valid].double()
    out["map_at_r"] = ((precision * rel).sum(1)[valid] / rv).mean().item()
    out["r_precision"] = (rel.sum(1)[valid] / rv).mean().item()
    km = KMeans(n_clusters=len(sizes), n_init=1, max_iter=20, random_state=seed).fit(x)
    out["nmi"] = normalized_mutual_info_score(labels, km.labels_)
    return out


def ours(x, labels, ks, seed=0, device="cpu"):
    from trainer.evaluation.metrics import compute_metrics

    return compute_metrics(x, labels, recall_ks=ks, nmi=True, map_r=True, seed=seed, device=device)[0]


def measure(impl: str, size: str, dim: int, device: str = "cpu") -> dict:
    """One measurement in this process: seconds and peak memory of the metric computation (on cuda: after a
    warm-up on the rows of 4% of the classes; peak_gpu_gib is the device's peak allocation)."""
    import torch

    n, classes, ks = SIZES[size]
    x, labels = clustered(n, classes, dim)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        few = labels < max(2, classes // 25)  # ~4% of the rows, whole classes
        ours(x[few], labels[few], tuple(k for k in ks if k < 100), device=device)
        sync()
        torch.cuda.reset_peak_memory_stats()
    t, cpu = time.perf_counter(), time.process_time()
    values = ours(x, labels, ks, device=device) if impl == "ours" else baseline(x, labels, ks)
    sync()
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out = {"impl": impl, "size": size, "n": n, "classes": classes, "seconds": seconds, "cpu_s": cpu,
           "peak_gib": peak, "metrics": values, "device": device}
    if device == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def forward_rate(backbone: str, dim: int, device: str, batch: int = 256, warmup: int = 3, batches: int = 10,
                 image_size: int = 224) -> float:
    """Images/s of the embedder's inference forward (bf16 autocast on cuda, channels_last), synthetic input."""
    import torch

    from trainer.config import ModelConfig
    from trainer.model import build_model

    model = build_model(ModelConfig(backbone=backbone, pretrained=False, dim=dim)).to(device).eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    if device == "cuda":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for _ in range(warmup):
            model(x)
        sync()
        t = time.perf_counter()
        for _ in range(batches):
            model(x)
        sync()
    return batch * batches / (time.perf_counter() - t)


def run_child(impl: str, size: str, dim: int, device: str = "cpu") -> dict:
    cmd = [sys.executable, __file__, "--one", impl, "--size", size, "--dim", str(dim), "--device", device]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def row(m: dict, ref: dict | None = None) -> str:
    vals = m["metrics"]
    names = [k for k in vals if k.startswith("recall_at_")][:2] + ["map_at_r", "nmi"]
    agree = ""
    if ref is not None:
        gap = max(abs(vals[k] - ref["metrics"][k]) for k in vals if k != "nmi")
        agree = f"  max |diff| vs baseline (all but NMI) {gap:.1e}"
    shown = " ".join(f"{k}={vals[k]:.4f}" for k in names)
    return (f"{m['size']:>5} {m['n']:>6} x {m['classes']:>5} cls  {m['impl']:>8}: {m['seconds']:6.1f} s wall "
            f"{m['cpu_s']:6.1f} s CPU  peak {m['peak_gib']:.2f} GiB   {shown}{agree}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--skip-sop", action="store_true")
    p.add_argument("--only-sop", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where ours runs (cuda: torch kNN and k-means; implies --only-sop)")
    p.add_argument("--size", choices=["sop", "tiny"], default="sop",
                   help="the size of the single-set run (tiny: a smoke test of this script)")
    p.add_argument("--forward-backbone", default="",
                   help="also time this embedder's forward and estimate the whole evaluation (e.g. resnet50)")
    p.add_argument("--forward-batches", type=int, default=10, help="timed forward batches (after 3 warm-up ones)")
    p.add_argument("--forward-batch", type=int, default=256, help="forward batch size")
    p.add_argument("--forward-image-size", type=int, default=224, help="forward input size in pixels")
    p.add_argument("--one", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(measure(a.one, a.size, a.dim, a.device)))
        return
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        a.only_sop, a.skip_sop = True, False
    print(f"dim {a.dim}; each line one process; peak = its peak RSS incl. Python and torch; CPU = user+system "
          f"seconds of all its threads; {os.cpu_count()} cores, load average now {os.getloadavg()[0]:.1f} "
          f"(a shared machine stretches wall time, not CPU time)")
    for size in () if a.only_sop else ("cub", "cars"):
        base = run_child("baseline", size, a.dim)
        mine = run_child("ours", size, a.dim)
        print(row(base))
        print(row(mine, base), f"  speed-up x{base['seconds'] / mine['seconds']:.1f}", flush=True)
    if a.skip_sop:
        return
    mine = run_child("ours", a.size, a.dim, a.device)
    print(row(mine))
    if a.device == "cpu":
        print(f"target 120 s / 4 GiB: wall {mine['seconds']:.0f} s, CPU {mine['cpu_s']:.0f} s "
              f"(= {mine['cpu_s'] / os.cpu_count():.0f} s on {os.cpu_count()} free cores), "
              f"peak {mine['peak_gib']:.2f} GiB; load average now {os.getloadavg()[0]:.1f}")
    peak = f"GPU {mine['peak_gpu_gib']:.2f}" if a.device == "cuda" else f"{mine['peak_gib']:.2f}"
    print(f"metric step on {a.device}: {mine['seconds']:.3f} s, peak {peak} GiB"
          + (" (target < 1 s)" if a.device == "cuda" else ""))
    if a.forward_backbone:
        sys.path.insert(0, str(ROOT))
        rate = forward_rate(a.forward_backbone, a.dim, a.device, a.forward_batch, batches=a.forward_batches,
                            image_size=a.forward_image_size)
        n = mine["n"]
        print(f"whole evaluation estimate: {n / rate + mine['seconds']:.2f} s = {n:,} {a.forward_backbone} "
              f"forward passes at {rate:,.0f} img/s ({n / rate:.2f} s; batch {a.forward_batch}, "
              f"{a.forward_image_size} px) + metric step {mine['seconds']:.2f} s on {a.device} "
              f"(target < 10 s; loading and decoding not included)")


if __name__ == "__main__":
    main()
