"""Run a test function on W spawned CPU ranks in one gloo process group and collect what each rank returns."""
import os

import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.distributed import free_port


def _entry(rank: int, world: int, port: int, fn, args: tuple, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out.put((rank, fn(rank, world, *args)))
        dist.barrier()  # no rank tears the group down while another still talks to it (SIGABRT at exit)
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(fn, world: int, *args, timeout: float = 120) -> dict:
    """{rank: fn(rank, world, *args)} from `world` spawned processes (fn: a module-level function returning
    picklable values, e.g. numpy arrays rather than tensors); every rank must exit cleanly."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        res = dict(out.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.exitcode is None:
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return res
