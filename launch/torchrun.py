"""torchrun, saying in words what each node joined and what went wrong, instead of tracebacks.

Takes torchrun's arguments plus its own `--join-timeout S` (`python -m launch.torchrun --nnodes 2
--join-timeout 900 ... -m trainer --config ...`) and runs torchrun in this process, so signals (SIGTERM from
SLURM or `docker stop`) reach torchrun's own handlers, which forward them to the workers (the trainer then
checkpoints and exits; torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, default 30, before SIGKILL).

- Once the rendezvous is complete, every node prints one line: its node rank, local and global ranks, the
  rendezvous endpoint, the world size and the OMP_NUM_THREADS its workers get.
- OMP_NUM_THREADS, unless set by the user: the CPUs this launcher may use divided by the worker processes
  of all nodes on this machine (torchrun alone gives 1 with several processes and leaves one process per
  node to use every core, even when several nodes share a machine).
- Explained instead of a traceback: a node that never joins (`--join-timeout`), an endpoint nobody serves,
  the stop signal (exit status 128 + signal number, as a shell reports it), and workers that refused their
  input (exit status 2, `trainer.errors.UserError`: they printed why; the launcher adds one line, does not
  restart them, and exits 2).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousTimeoutError,
)
from torch.distributed.run import determine_local_world_size, parse_args, run

from trainer.errors import EXIT_USER_ERROR, LAUNCHER_PID_ENV

DEFAULT_JOIN_TIMEOUT = 600  # torchrun's default, in seconds
USER_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")  # as the user gave it (torchrun may set its own)

# torchrun (torch 2.14) shares the rendezvous' TCP store with the workers and keeps it across restarts, so a
# restarted worker group finds the dead group's process-group keys in it: gloo then connects to the dead
# ranks' ports ("Connection refused", or a hang in init_process_group) and --max-restarts never recovers.
# A store per rendezvous round avoids that (tests/launch/test_launch_elastic.py kills a worker to check).
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
            f"launch: the {where} timed out after --join-timeout {timeout} s: not all of --nnodes {args.nnodes} "
            f"nodes joined. A node never started or cannot reach the endpoint. Check that the same command "
            f"(same --rdzv-id, --rdzv-endpoint and --nnodes) runs on every node, that every node can open a "
            f"TCP connection to {args.rdzv_endpoint} (the first node serves it; firewalls, host name "
            f"resolution), and that --nnodes is the number of nodes you started. Wait longer with "
            f"--join-timeout SECONDS.")
    if isinstance(error, RendezvousConnectionError):
        cause = str(error.__cause__ or error).strip().splitlines()[0]
        return (
            f"launch: cannot reach the {where} ({cause}). The first node serves the rendezvous; start it "
            f"first (or within a minute of the others), check the host name resolves on this node and the "
            f"port is open between nodes.")
    return f"launch: the {where} was closed ({error}): the job is over or another node shut it down."


def split_own_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's own options (before the training script) and torchrun's arguments."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--join-timeout", type=int, default=None,
                     help="seconds every node waits for all --nnodes to join (torchrun's rdzv join_timeout)")
    script = next((i for i, a in enumerate(argv) if a == "-m" or a.endswith(".py")), len(argv))
    mine, rest = own.parse_known_args(argv[:script])
    if mine.join_timeout is not None:
        if mine.join_timeout <= 0:
            sys.exit(f"launch: --join-timeout: give seconds > 0, got {mine.join_timeout}")
        conf = [kv for kv in _option(rest, "--rdzv-conf", "--rdzv_conf").split(",") if kv]
        conf = [kv for kv in conf if not kv.startswith("join_timeout=")] + [f"join_timeout={mine.join_timeout}"]
        rest = _without(rest, "--rdzv-conf", "--rdzv_conf") + ["--rdzv-conf", ",".join(conf)]
    return mine, rest + argv[script:]


def _option(argv: list[str], *names: str) -> str:
    for i, a in enumerate(argv):
        if a in names and i + 1 < len(argv):
            return argv[i + 1]
        if any(a.startswith(n + "=") for n in names):
            return a.split("=", 1)[1]
    return ""


def _without(argv: list[str], *names: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not any(a.startswith(n + "=") for n in names):
            out.append(a)
    return out


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def omp_threads(processes_on_this_machine: int) -> int:
    """Intra-op threads per worker: this machine's CPUs shared by all workers on it (at least 1)."""
    return max(1, usable_cpus() // max(1, processes_on_this_machine))


def nodes_on_this_machine(store, group_rank: int, group_world_size: int) -> int:
    """How many of the joined nodes run on this host (nodes sharing a machine split its cores); every node
    writes its host name in the rendezvous store and reads the others' (a store per rendezvous round)."""
    host = socket.gethostname()
    store.set(f"proxygml/host/{group_rank}", host)
    return sum(store.get(f"proxygml/host/{r}").decode() == host for r in range(group_world_size))


def node_line(args, worker_group, omp: str) -> str:
    """One line per node and rendezvous round: node rank, local -> global ranks, endpoint, world size."""
    workers = worker_group.workers
    local = [w.local_rank for w in workers]
    ranks = [w.global_rank for w in workers]
    span = lambda xs: f"{xs[0]}-{xs[-1]}" if len(xs) > 1 else str(xs[0])  # noqa: E731
    where = args.rdzv_endpoint or f"{worker_group.master_addr}:{worker_group.master_port}"
    endpoint = "standalone (this machine)" if args.standalone else f"{where} (id {args.rdzv_id!r})"
    return (f"launch: node {worker_group.group_rank} of {worker_group.group_world_size} joined rendezvous "
            f"{endpoint}: local ranks {span(local)} = global ranks {span(ranks)} of world size "
            f"{workers[0].world_size}, OMP_NUM_THREADS={omp}")


def install_hooks(args) -> None:
    """Patch torchrun's agent (torch 2.14): a line per node after each rendezvous (and the workers' thread
    count), and no restart of workers that exited with a user error: the same input fails again; workers that
    exit with a user error while the launcher stops them (srun ends a node's task when another node's exits
    first) still make the launcher's status 2."""
    rendezvous, monitor = SimpleElasticAgent._rendezvous, LocalElasticAgent._monitor_workers

    def _rendezvous(self, worker_group):
        rendezvous(self, worker_group)
        if USER_OMP_NUM_THREADS is None:
            nodes = nodes_on_this_machine(worker_group.store, worker_group.group_rank,
                                          worker_group.group_world_size)
            os.environ["OMP_NUM_THREADS"] = str(omp_threads(nodes * len(worker_group.workers)))
        print(node_line(args, worker_group, os.environ.get("OMP_NUM_THREADS", "unset")), file=sys.stderr,
              flush=True)

    def _monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        if result.is_failed() and any(f.exitcode == EXIT_USER_ERROR for f in result.failures.values()):
            self._remaining_restarts = 0
            refused_input()
        return result

    shutdown = LocalElasticAgent._shutdown

    def _shutdown(self, *args, **kwargs):  # a stop signal came: did the workers end on a user error meanwhile?
        shutdown(self, *args, **kwargs)
        handlers = getattr(self._pcontext, "subprocess_handlers", None) or {}
        if any(getattr(h.proc, "returncode", None) == EXIT_USER_ERROR for h in handlers.values()):
            refused_input()

    SimpleElasticAgent._rendezvous = _rendezvous  # type: ignore[method-assign]  # patched on purpose, see above
    LocalElasticAgent._monitor_workers = _monitor_workers  # type: ignore[method-assign]  # patched on purpose, see above
    LocalElasticAgent._shutdown = _shutdown  # type: ignore[method-assign]  # patched on purpose, see above


USER_ERROR_SEEN = False  # set when a worker exited with a user error: this launcher then exits 2, whatever follows


def refused_input() -> None:
    """The workers refused their input (exit status 2): the launcher's status is 2 from now on. A stop signal
    that comes now (srun --kill-on-bad-exit ends the other nodes' tasks when one exits; torchrun's rendezvous
    teardown may fail once another node is gone) must not turn it into 143 or 1: no worker is left to stop."""
    global USER_ERROR_SEEN
    USER_ERROR_SEEN = True
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def user_error_line(ranks: str = "") -> str:
    return (f"launch: the trainer refused its input{f' on rank(s) {ranks}' if ranks else ''} (exit status "
            f"{EXIT_USER_ERROR}; the reason is printed above); fix it and start again")


class _QuietUserErrors(logging.Filter):
    """torchrun logs every failed worker and every SIGTERM it sends the others; a user error is told once, by
    the worker and by main(), and a crash keeps torchrun's failure report (each rank's exit code or signal)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return f"(exitcode: {EXIT_USER_ERROR})" not in msg and "closing signal SIGTERM" not in msg


def user_error(error: ChildFailedError) -> str | None:
    """The launcher's line when the workers stopped on a user error (exit status 2), else None."""
    rank, first = error.get_first_failure()
    if first.exitcode != EXIT_USER_ERROR:
        return None
    ranks = sorted(r for r, f in error.failures.items() if f.exitcode == EXIT_USER_ERROR)
    return user_error_line(", ".join(map(str, ranks)))


def main(argv: list[str] | None = None) -> None:
    own, torchrun_argv = split_own_args(sys.argv[1:] if argv is None else argv)
    args = parse_args(torchrun_argv)
    nproc = determine_local_world_size(args.nproc_per_node)
    if USER_OMP_NUM_THREADS is None:  # before torchrun: it would set 1 (with a warning) for several processes
        os.environ["OMP_NUM_THREADS"] = str(omp_threads(nproc))
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the workers' parent: they stop if it dies (even early)
    install_hooks(args)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietUserErrors())
    try:
        run(args)
    except (RendezvousTimeoutError, RendezvousConnectionError, RendezvousClosedError, SignalException) as e:
        if USER_ERROR_SEEN:  # the rendezvous' teardown after the workers refused their input: that is the news
            print(user_error_line(), file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        if isinstance(e, SignalException):
            print(f"launch: got {e.sigval.name}: the workers were asked to checkpoint and stop", file=sys.stderr)
            sys.exit(128 + int(e.sigval))
        sys.exit(explain(e, args))
    except ChildFailedError as e:
        line = user_error(e)
        if line is None:
            raise
        print(line, file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
