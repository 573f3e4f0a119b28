"""ProxyGML forward+backward: `loss/` (sparse, exact) against the dense formulation, in the same run.

    python bench/loss_bench.py [--device cpu|cuda] [--reps 5] [--cpu-batch 64] [--amp bf16] [--tf32]

Prints one table: median forward+backward time and peak memory of each, and the ratios. The dense
formulation is the released code's (dense W, dense label matrix Y^p, W @ Y^p, the CN x CN proxy-proxy matrix
times Y^p); ours never builds those. Cases are the issue's: CUB (C=100, N=12, M=32 and 256, lam=0.3), SOP
(C=11318, N=1, M=256, lam=0 and 0.3), SOP N=4 lam=0.3, C=100,000 N=1 M=256 (lam=0: the regulariser is
O((CN)^2 dim); on cuda also lam=0.3 and C=1,000,000 lam=0). On the CPU, M is capped at --cpu-batch (the
regulariser does not depend on M) and a C=1,000 N=4 case is added so that a regulariser ratio is measured;
a dense run whose estimated memory or flops exceed --max-dense-gb / --max-dense-gflop is skipped and the
table says why; on cuda the dense one runs until it is out of memory and the table says so. Peak memory:
on cuda max_memory_allocated over the step; on the CPU each measurement runs in a fresh process and reports
its resident-set high-water mark above the resident set before the step. `--amp bf16` runs both under bf16
autocast (ours then does its proxy-proxy product in bf16 with fp32 accumulation, the rest in fp32); `--tf32`
lets CUDA fp32 matmuls use TF32. Both are named in the table's title line.

Measured on the development machine (2 shared cores, load ~8 from other jobs, CPU, dim 512, r 0.05, M
capped at 64; `python bench/loss_bench.py --reps 3`): see the loss section of the README.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loss import ProxyGML  # noqa: E402


@dataclass
class Case:
    name: str
    C: int
    N: int
    M: int
    lam: float
    dim: int = 512
    r: float = 0.05


def cases(device: str, cpu_batch: int) -> list[Case]:
    out = [Case("CUB M=32", 100, 12, 32, 0.3), Case("CUB M=256", 100, 12, 256, 0.3),
           Case("SOP lam=0", 11318, 1, 256, 0.0), Case("SOP lam=0.3", 11318, 1, 256, 0.3),
           Case("SOP N=4 lam=0.3", 11318, 4, 256, 0.3), Case("C=100k lam=0", 100_000, 1, 256, 0.0)]
    if device == "cuda":
        return out + [Case("C=100k lam=0.3", 100_000, 1, 256, 0.3), Case("C=1M lam=0", 1_000_000, 1, 256, 0.0)]
    out.insert(5, Case("C=1000 N=4 lam=0.3", 1000, 4, 256, 0.3))
    for c in out:
        c.M = min(c.M, cpu_batch)
    return out


def dense_proxygml(x, proxies, labels, C, N, r, lam):
    """The released code's formulation (with its epsilons), pos_mask and class_mask on."""
    xh, ph = F.normalize(x, dim=1), F.normalize(proxies, dim=1)
    sim = xh @ ph.t()
    proxy_class = torch.arange(C * N, device=x.device) // N
    y_proxy = F.one_hot(proxy_class, C).to(sim.dtype)  # CN x C
    positive = (labels[:, None] == proxy_class[None]).to(sim.dtype)
    idx = torch.topk(sim + 1000 * positive, math.ceil(r * C * N), dim=1).indices
    w = torch.zeros_like(sim).scatter(1, idx, 1.0) * sim
    logits = w @ y_proxy
    e = torch.exp(logits) * (logits != 0).to(sim.dtype)
    predict = e / (1e-8 + e.sum(dim=1, keepdim=True))
    loss = -torch.log(predict[torch.arange(len(labels)), labels] + 1e-20).mean()
    if lam > 0:
        loss = loss + lam * F.cross_entropy((ph @ ph.t()) @ y_proxy, proxy_class)
    return loss


def dense_estimate(c: Case) -> tuple[float, float]:
    """(bytes, flops) of one dense forward+backward, roughly."""
    K = c.C * c.N
    elems = 4 * c.M * K + 3 * c.M * c.C + K * c.C + (3 * K * K + 3 * K * c.C if c.lam else 0)
    flops = 3 * (2 * c.M * K * c.dim + 2 * c.M * K * c.C + (2 * K * K * c.dim + 2 * K * K * c.C if c.lam else 0))
    return 4.0 * elems, float(flops)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def set_precision(device: str, amp: str, tf32: bool):
    """TF32 for fp32 matmuls (cuda) as asked; returns the autocast context of one step."""
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return torch.autocast(device, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()


def measure(c: Case, impl: str, device: str, reps: int, slow_s: float, amp: str = "none",
            tf32: bool = False) -> dict:
    """Median fwd+bwd seconds and peak extra bytes of one implementation on one case (this process)."""
    autocast = set_precision(device, amp, tf32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(c.M, c.dim, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, c.C, (c.M,), generator=g).to(device)
    crit = ProxyGML(c.C, c.dim, c.N, r=c.r, lam=c.lam).to(device)
    if impl == "ours":
        def step():
            with autocast:
                return crit(x, labels)
    else:
        def step():
            with autocast:
                return dense_proxygml(x, crit.proxies, labels, c.C, c.N, c.r, c.lam)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times, peak = [], 0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_kib("VmRSS") * 1024
    for i in range(reps + 1):
        x.grad = crit.proxies.grad = None
        sync()
        t0 = time.perf_counter()
        loss = step()
        loss.backward()
        sync()
        times.append(time.perf_counter() - t0)
        if i == 0 and times[0] > slow_s:
            break  # one slow run is the measurement
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss_kib("VmHWM") * 1024) - base
    timed = times[1:] or times
    return {"time": statistics.median(timed), "peak": peak, "n": len(timed), "loss": loss.item()}


def run_one(c: Case, impl: str, args) -> dict:
    if impl == "dense":
        need_b, need_f = dense_estimate(c)
        if args.device == "cpu" and need_b > args.max_dense_gb * 2 ** 30:
            return {"skip": f"est. {need_b / 2 ** 30:.0f} GB"}
        if args.device == "cpu" and need_f > args.max_dense_gflop * 1e9:
            return {"skip": f"est. {need_f / 1e12:.1f} TFLOP"}
    if args.device == "cuda":
        try:
            return measure(c, impl, "cuda", args.reps, args.slow_s, args.amp, args.tf32)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {"skip": "out of memory"}
    child = json.dumps([asdict(c), impl, args.reps, args.slow_s, args.amp])
    cmd = [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--child", child]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"skip": f"failed (exit {proc.returncode})"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_time(res: dict) -> str:
    return res["skip"] if "skip" in res else f"{res['time'] * 1e3:,.1f} ms" + ("*" if res["n"] == 1 else "")


def fmt_mem(res: dict) -> str:
    return "-" if "skip" in res else f"{res['peak'] / 2 ** 20:,.0f} MiB"


def ratio(a: dict, b: dict, key: str) -> str:
    if "skip" in a or "skip" in b or b[key] <= 0:
        return "-"
    return f"{a[key] / b[key]:.1f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--reps", type=int, default=5, help="timed runs after one warm-up (median)")
    ap.add_argument("--cpu-batch", type=int, default=64, help="cap on M on the CPU")
    ap.add_argument("--slow-s", type=float, default=5.0, help="a warm-up slower than this is the only run")
    ap.add_argument("--max-dense-gb", type=float, default=6.0, help="CPU: skip dense runs estimated above")
    ap.add_argument("--max-dense-gflop", type=float, default=400.0, help="CPU: skip dense runs estimated above")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per run (default: torch's)")
    ap.add_argument("--only", default="", help="comma-separated case names to run (default: all)")
    ap.add_argument("--amp", choices=["none", "bf16"], default="none", help="run each step under bf16 autocast")
    ap.add_argument("--tf32", action="store_true", help="cuda: fp32 matmuls may use TF32")
    ap.add_argument("--profile", action="store_true",
                    help="then print torch.profiler's top operators of 3 steps of ours per case (where time goes)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        c, impl, reps, slow_s, amp = json.loads(args.child)
        print(json.dumps(measure(Case(**c), impl, "cpu", reps, slow_s, amp)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    chosen = [c for c in cases(args.device, args.cpu_batch) if not args.only or c.name in args.only.split(",")]
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    precision = ("bf16 autocast" if args.amp == "bf16" else "fp32") + (", TF32 matmuls" if args.tf32 else "")
    print(f"# ProxyGML fwd+bwd, {name}, torch {torch.__version__}, {precision}, dim 512, r 0.05, median of up to "
          f"{args.reps} after a warm-up (* = a single run)")
    print("| case | C | N | M | lam | dense time | ours time | speed-up | dense peak | ours peak | memory ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in chosen:
        ours, dense = run_one(c, "ours", args), run_one(c, "dense", args)
        print(f"| {c.name} | {c.C:,} | {c.N} | {c.M} | {c.lam} | {fmt_time(dense)} | {fmt_time(ours)} | "
              f"{ratio(dense, ours, 'time')} | {fmt_mem(dense)} | {fmt_mem(ours)} | {ratio(dense, ours, 'peak')} |",
              flush=True)
    if args.profile:
        for c in chosen:
            print(f"\n## profile of ours, {c.name}, {precision}")
            print(profile(c, args.device, args.amp, args.tf32), flush=True)


def profile(c: Case, device: str, amp: str, tf32: bool, steps: int = 3) -> str:
    """torch.profiler's table of the top 15 operators over `steps` fwd+bwd of ours, after one warm-up step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    autocast = set_precision(device, amp, tf32)
    x = torch.randn(c.M, c.dim, device=device, requires_grad=True)
    labels = torch.randint(0, c.C, (c.M,), device=device)
    crit = ProxyGML(c.C, c.dim, c.N, r=c.r, lam=c.lam).to(device)

    def step():
        with autocast:
            crit(x, labels).backward()
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "device_time_total" if device == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)


if __name__ == "__main__":
    main()
