"""torchrun, with a plain explanation instead of a bare traceback when the rendezvous fails.

Takes exactly torchrun's arguments (`python -m launch.torchrun --nnodes 2 ... -m trainer --config ...`) and runs
torchrun in this process, so signals (SIGTERM from SLURM or `docker stop`) reach torchrun's own handlers,
which forward them to the workers (the trainer then checkpoints and exits; torchrun waits
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, default 30, before SIGKILL). Caught and explained: a node that never joins
(`RendezvousTimeoutError` after `--rdzv-conf join_timeout=S`), an endpoint nobody serves, and the stop signal
itself (exit status 128 + signal number, as a shell reports it, instead of a traceback).
"""
from __future__ import annotations

import os
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.rendezvous.api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousTimeoutError,
)
from torch.distributed.run import parse_args, run

DEFAULT_JOIN_TIMEOUT = 600  # torchrun's default, in seconds

# torchrun (torch 2.14) shares the rendezvous' TCP store with the workers and keeps it across restarts, so a
# restarted worker group finds the dead group's process-group keys in it: gloo then connects to the dead
# ranks' ports ("Connection refused", or a hang in init_process_group) and --max-restarts never recovers.
# A store per rendezvous round avoids that (tests/test_launch_elastic.py kills a worker to check).
os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")


def rdzv_conf(args) -> dict[str, str]:
    """torchrun's `--rdzv-conf k1=v1,k2=v2` as a dict."""
    items = [kv.split("=", 1) for kv in (args.rdzv_conf or "").split(",") if "=" in kv]
    return {k.strip(): v.strip() for k, v in items}


def explain(error: Exception, args) -> str:
    """What went wrong with the rendezvous, and what to check, in words."""
    where = f"rendezvous {args.rdzv_id!r} at {args.rdzv_endpoint} (--rdzv-backend {args.rdzv_backend})"
    if isinstance(error, RendezvousTimeoutError):
        timeout = rdzv_conf(args).get("join_timeout", DEFAULT_JOIN_TIMEOUT)
        return (
            f"launch: the {where} timed out after join_timeout={timeout} s: not all of --nnodes {args.nnodes} "
            f"nodes joined. A node never started or cannot reach the endpoint. Check that the same command "
            f"(same --rdzv-id, --rdzv-endpoint and --nnodes) runs on every node, that every node can open a "
            f"TCP connection to {args.rdzv_endpoint} (the first node serves it; firewalls, host name "
            f"resolution), and that --nnodes is the number of nodes you started. Wait longer with "
            f"--rdzv-conf join_timeout=SECONDS.")
    if isinstance(error, RendezvousConnectionError):
        cause = str(error.__cause__ or error).strip().splitlines()[0]
        return (
            f"launch: cannot reach the {where} ({cause}). The first node serves the rendezvous; start it "
            f"first (or within a minute of the others), check the host name resolves on this node and the "
            f"port is open between nodes.")
    return f"launch: the {where} was closed ({error}): the job is over or another node shut it down."


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except (RendezvousTimeoutError, RendezvousConnectionError, RendezvousClosedError) as e:
        sys.exit(explain(e, args))
    except SignalException as e:
        print(f"launch: got {e.sigval.name}: the workers were asked to checkpoint and stop", file=sys.stderr)
        sys.exit(128 + int(e.sigval))


if __name__ == "__main__":
    main()
