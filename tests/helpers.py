"""What the test rooms share as plain code (importable by spawned children, which see no conftest fixtures):
one free port and one way to run a function on W gloo ranks."""
from __future__ import annotations

import multiprocessing.connection
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.distributed import free_port

__all__ = ["free_port", "run_on_gloo_ranks"]

GRACE_S = 10.0  # after one rank failed, how long the others get to fail or finish on their own


def _rank_main(fn, rank: int, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    """One spawned rank: join the gloo group, run fn, write ("ok", value) or ("error", traceback) for the parent,
    leave the group, and exit without C++ static destructors (gloo's threads sometimes abort the process at
    interpreter exit, "terminate called without an active exception")."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    code = 1
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        torch.save(("ok", value), os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():  # fn may have left the group itself
            dist.barrier()  # no rank tears the group down while another still talks to it (SIGABRT at exit)
            dist.destroy_process_group()
        code = 0
    except BaseException:  # noqa: BLE001 - whatever it is, the parent shows it
        torch.save(("error", traceback.format_exc()), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_on_gloo_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run fn(rank, world_size, *args) in world_size spawned processes, each in a gloo group on 127.0.0.1 and a
    free port (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK set; torch threads 1); the group is destroyed at
    the end. Returns the ranks' return values (by rank; they travel pickled through a file, so tensors come
    back by value). Raises RuntimeError with each failed rank's traceback if any rank raised, died or was
    still running at the timeout (the rest are killed: it never hangs). fn must be importable (module level)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gloo-ranks-") as out_dir:
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, out_dir, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        end = time.monotonic() + timeout
        pending = list(procs)
        try:
            while pending and time.monotonic() < end:
                multiprocessing.connection.wait([p.sentinel for p in pending], timeout=end - time.monotonic())
                pending = [p for p in pending if p.exitcode is None]
                if any(p.exitcode for p in procs):  # a rank failed: the others may wait in a collective forever
                    end = min(end, time.monotonic() + GRACE_S)
        finally:  # also when the parent is interrupted: no rank outlives the call
            other_failed = any(p.exitcode for p in procs)  # before the kills: why the rest was stopped
            for p in pending:
                p.kill()
            for p in procs:
                p.join(10)
        values, failures = [], []
        for r, p in enumerate(procs):
            path = os.path.join(out_dir, f"rank{r}.pt")
            status, value = torch.load(path, weights_only=False) if os.path.exists(path) else (None, None)
            values.append(value)
            if status == "error":
                failures.append(f"--- rank {r} raised:\n{value}")
            elif status is None:
                why = (f"exit code {p.exitcode}, no result" if p not in pending else
                       f"still running {GRACE_S:g} s after another rank failed, killed" if other_failed else
                       f"still running at the timeout ({timeout:g} s), killed")
                failures.append(f"--- rank {r}: {why}")
    if failures:
        raise RuntimeError(f"{len(failures)} of {world_size} gloo ranks failed:\n" + "\n".join(failures))
    return values
