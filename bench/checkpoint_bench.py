"""Per-rank peak host memory and wall time of a checkpoint save and load with class-sharded proxies:
today's single-file format (checkpoint.format=torch) against DCP folders (checkpoint.format=dcp).

    python bench/checkpoint_bench.py [--ranks 2 4] [--classes 100000 1000000] [--dim 64]

Each configuration starts W gloo processes on 127.0.0.1 (one thread each). Every rank builds a sharded ProxyGML
criterion (N = 1), a small linear embedder and Adam state (one step), then saves and loads through the trainer's
own code paths: torch = `full_state_dict()` + `map_group_rows(..., gather_rows)` on every rank and one
`Checkpointer.save` by rank 0, load = `checkpoint.load` on every rank and `shard_rows`; dcp =
`dcp_checkpoint.build_state` + `DCPSaver.save` (each rank writes its block), load = `load_train_state`.
Printed per phase: the largest rank's peak resident memory above its resident memory just before the phase
(/proc/self/clear_refs resets the high-water mark), the slowest rank's wall time, and the checkpoint's size
on disk, with the 1-minute load average when the row was measured (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_peak() -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return rss_mib("VmRSS")


def du_mib(path: str) -> float:
    if os.path.isfile(path):
        return os.path.getsize(path) / 2**20
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def worker(rank: int, size: int, port: int, cfg: dict, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    from loss.distributed import build_criterion
    from loss.row_sharded import map_group_rows
    from trainer.checkpoint import Checkpointer, load
    from trainer.dcp_checkpoint import build_state, load_train_state
    from trainer.dcp_save import DCPSaver
    from trainer.engines import TrainModule

    torch.manual_seed(0)
    embedder = nn.Linear(64, cfg["dim"])
    crit = build_criterion("sharded", cfg["classes"], cfg["dim"], r=0.01, lam=0.0, validate=False)
    module = TrainModule(embedder, crit)
    opt = torch.optim.Adam([dict(params=embedder.parameters(), name="backbone"),
                            dict(params=[crit.proxies], name="proxies")], lr=1e-3)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ckpt = Checkpointer(cfg["dir"], keep_last=1)
    meta = dict(config={}, epoch=0, step=1, batch_in_epoch=1, rng=[], world_size=size, run_uid="bench")
    res = {}

    def phase(name, fn):
        dist.barrier()
        base = reset_peak()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        res[name] = {"time": time.perf_counter() - t0, "peak": rss_mib("VmHWM") - base}

    if cfg["format"] == "torch":
        def save():
            crit_sd = crit.full_state_dict()
            sd = map_group_rows(opt.state_dict(), "proxies", crit.proxies.shape[0], crit.gather_rows)
            if rank == 0:
                ckpt.save(dict(meta, model=embedder.state_dict(), criterion=crit_sd, optimizer=sd, scheduler={}),
                          1)

        def restore():
            state = load(ckpt.latest())
            crit.load_full_state_dict(state["criterion"])
            rows = crit.num_classes * crit.proxies_per_class
            opt.load_state_dict(map_group_rows(state["optimizer"], "proxies", rows, crit.shard_rows))
    else:
        from trainer.train_state import Trained
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        parts = Trained(embedder, crit, module, opt, sched, None).parts
        saver = DCPSaver(ckpt)

        def save():
            sd = build_state(meta, parts, rank)
            saver.save(sd, 1, meta)

        def restore():
            state = load_train_state(ckpt.latest(), parts)
            with torch.no_grad():
                crit.proxies.copy_(state["criterion"]["proxies"])
            opt.load_state_dict(state["optimizer"])

    phase("save", save)
    phase("load", restore)
    everyone = [None] * size
    dist.all_gather_object(everyone, res)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"ranks": everyone, "disk": du_mib(ckpt.latest())}, f)
    dist.barrier()
    dist.destroy_process_group()


def run(size: int, cfg: dict) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(dir=cfg.pop("tmp")) as tmp:
        cfg = dict(cfg, dir=os.path.join(tmp, "ck"))
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(size, port, cfg, out), nprocs=size, join=True)
        with open(out) as f:
            result = json.load(f)
        shutil.rmtree(cfg["dir"], ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--tmp", default=None, help="where the checkpoints are written (default: the system's temp)")
    args = ap.parse_args()
    print(f"# checkpoint save/load, sharded proxies (N 1, dim {args.dim}) + Adam moments, CPU gloo ranks "
          f"(1 thread each), torch {torch.__version__}; peak = largest rank's RSS above its start of the phase")
    print("| C | ranks | format | save time | save peak/rank (max) | load time | load peak/rank (max) | on disk | "
          "load avg |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for classes in args.classes:
        for size in args.ranks:
            for fmt in ("torch", "dcp"):
                r = run(size, dict(format=fmt, classes=classes, dim=args.dim, tmp=args.tmp))
                ranks = r["ranks"]

                def worst(phase, key, ranks=ranks):
                    return max(x[phase][key] for x in ranks)
                print(f"| {classes:,} | {size} | {fmt} | {worst('save', 'time'):.2f} s | "
                      f"{worst('save', 'peak'):,.0f} MiB | {worst('load', 'time'):.2f} s | "
                      f"{worst('load', 'peak'):,.0f} MiB | {r['disk']:,.0f} MiB | {os.getloadavg()[0]:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
