"""Per-rank peak memory and step time of ``gather`` (replicated proxies) vs ``sharded`` ProxyGML.

    python bench/sharded_bench.py [--ranks 2 4] [--classes 100000 1000000] [--batch 16] [--dim 64]

Each configuration starts W gloo processes on 127.0.0.1 (one thread each) that train a small linear
embedder plus the criterion under DDP, as the trainer does (sharded proxies kept out of DDP), with SGD with
momentum: the step is forward, backward (DDP's gradient all-reduce included) and the optimizer step.
Printed: the median step time (slowest rank), the peak resident memory per rank above an idle torch
process (largest rank; parameters, gradients, momentum, DDP buckets, similarities), the proxies each rank
holds, and the gather/sharded ratios. lam = 0: the regulariser is O((C N)^2 dim / W) flops, out of reach
on the CPU at these C. On the CPU the dimension is 64 (not 512) so that 4 replicated copies of 1,000,000
proxies with their gradients, buckets and momentum fit the machine's memory.

Measured numbers and the 10,000,000-class arithmetic: see the loss section of the README.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loss.distributed import build_criterion, ddp_ignore  # noqa: E402


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


class Net(nn.Module):
    def __init__(self, criterion: nn.Module, dim_in: int, dim: int):
        super().__init__()
        self.embed = nn.Linear(dim_in, dim)
        self.criterion = criterion

    def forward(self, inputs, labels):
        return self.criterion(self.embed(inputs), labels)


def worker(rank: int, size: int, port: int, cfg: dict, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    warm = torch.randn(256, 256, requires_grad=True)  # load the kernels and gloo buffers before the baseline
    (warm @ warm).topk(8, dim=1).values.sum().backward()
    dist.all_reduce(torch.ones(1024))
    base = rss_mib("VmRSS")
    torch.manual_seed(0)
    crit = build_criterion(cfg["mode"], cfg["classes"], cfg["dim"], r=cfg["r"], lam=0.0, validate=False)
    net = Net(crit, 64, cfg["dim"])
    ddp_ignore(net, crit)
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(cfg["steps"] + 1):
        inputs = torch.randn(cfg["batch"], 64, generator=g)
        labels = torch.randint(0, cfg["classes"], (cfg["batch"],), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(inputs, labels).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    mine = {"time": statistics.median(times[1:]), "peak": rss_mib("VmHWM") - base,
            "proxies": crit.proxies.shape[0]}
    everyone = [None] * size
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()


def run(size: int, cfg: dict) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(size, port, cfg, out), nprocs=size, join=True)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--batch", type=int, default=16, help="samples per rank")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--r", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    args = ap.parse_args()
    print(f"# ProxyGML gather vs sharded, CPU gloo ranks (1 thread each), torch {torch.__version__}, "
          f"dim {args.dim}, r {args.r}, lam 0, {args.batch} samples per rank, SGD momentum, median of "
          f"{args.steps} steps after a warm-up")
    print("| C | ranks | gather step | sharded step | speed-up | gather peak/rank | sharded peak/rank | "
          "memory ratio | proxies/rank (g / s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for classes in args.classes:
        for size in args.ranks:
            res = {}
            for mode in ("gather", "sharded"):
                cfg = dict(mode=mode, classes=classes, dim=args.dim, r=args.r, batch=args.batch, steps=args.steps)
                per_rank = run(size, cfg)
                res[mode] = (max(x["time"] for x in per_rank), max(x["peak"] for x in per_rank),
                             max(x["proxies"] for x in per_rank))
            (tg, mg, pg), (ts, ms, ps) = res["gather"], res["sharded"]
            print(f"| {classes:,} | {size} | {tg * 1e3:,.0f} ms | {ts * 1e3:,.0f} ms | {tg / ts:.1f}x | "
                  f"{mg:,.0f} MiB | {ms:,.0f} MiB | {mg / ms:.1f}x | {pg:,} / {ps:,} |", flush=True)


if __name__ == "__main__":
    main()
