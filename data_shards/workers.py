"""Loader worker processes: how they start (signals left to the main process, death with their parent), how they
are stopped (never left to the garbage collector) and why a forked child never finalizes inherited garbage."""
from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import sys
import weakref

from torch.utils.data import DataLoader


def stop_workers(it) -> None:
    """Stop the worker processes of DataLoader iterator `it` now (a no-op for num_workers=0): torch's own
    shutdown (which marks `it` shut down, so that its __del__ does nothing later), then SIGKILL for any worker
    still alive (they ignore SIGTERM, see _ignore_stop_signals)."""
    workers = list(getattr(it, "_workers", []))
    if not workers:
        return
    with contextlib.suppress(Exception):
        it._shutdown_workers()
    for w in workers:
        if w.is_alive():
            w.kill()
            with contextlib.suppress(Exception):  # torch's SIGCHLD handler may raise about the killed worker
                w.join(timeout=5)


OPEN_LOADERS: weakref.WeakSet = weakref.WeakSet()


def _close_open_loaders() -> None:
    """At interpreter exit, before multiprocessing joins its children (atexit runs last-registered first): close
    every loader still open and kill the daemonic children left (DataLoader workers; multiprocessing itself would
    terminate them), so a worker that ignores SIGTERM can never block the exit."""
    for loader in list(OPEN_LOADERS):
        loader.close()
    import multiprocessing
    left = [c for c in multiprocessing.active_children() if c.daemon]  # workers of abandoned iterators or
    for child in left:  # collected loaders: multiprocessing would SIGTERM them (ignored) and join them forever
        with contextlib.suppress(Exception):
            child.kill()
    for child in left:
        with contextlib.suppress(Exception):  # torch's SIGCHLD handler raises about the killed worker: expected
            child.join(timeout=5)


# multiprocessing.util registers its own exit handler (which joins every child) when it is first imported, which
# may be after this module; import it first, so that this handler, registered later, runs before it (LIFO).
import multiprocessing.util  # noqa: E402, F401

atexit.register(_close_open_loaders)

# A forked child (loader worker, the writer's process pool) starts with a copy of the parent's objects, garbage
# included: unreachable cycles the parent's gc has not freed yet. Collected in the child, their finalizers run
# there, where the threads and locks they expect do not exist: a DistributedDataParallel reducer left by an
# earlier run destroyed its gloo process group inside a shard-writer process, which then waited forever on a
# condition variable (seen in the test suite); a DataLoader iterator's __del__ stopped workers it does not own.
# Freezing the inherited objects (gc.freeze, the CPython idiom for fork) means the child never collects them; what
# it allocates itself is collected as usual.
os.register_at_fork(after_in_child=gc.freeze)


def _ignore_stop_signals(_worker_id):
    """Loader workers leave SIGTERM/SIGUSR1/SIGINT to the main process, which checkpoints and stops them (a
    Ctrl-C reaches every process of the terminal's group: a worker dying of it would break the checkpoint step).

    torchrun stops its workers with killpg and SLURM signals every process of a step; torch's DataLoader
    workers would die of such a signal and break the step that should write the checkpoint. Since they ignore
    SIGTERM, they ask the kernel for SIGKILL when their parent dies (Linux prctl PR_SET_PDEATHSIG): a main
    process that fails and exits never leaves a worker behind, nor waits for one at interpreter exit.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


def _in_container() -> bool:
    """True in a podman / docker container (their marker files), where pid 1 is the container's first process."""
    return os.path.exists("/run/.containerenv") or os.path.exists("/.dockerenv")


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Ask the kernel to send this process `sig` when its parent exits (Linux prctl PR_SET_PDEATHSIG; strictly,
    when the parent THREAD that forked it ends: fork loader workers from a thread that lives as long as they
    must); if the parent is already gone by then (the parent is not `parent`, default the current one), send it
    now. Without `parent`, a parent that is pid 1 counts as gone (orphans are adopted by init) unless this process
    runs in a container whose pid 1 started it; with `parent` given, pid 1 is that parent (a launcher that is the
    container's first process). Returns whether it was set up (False elsewhere than Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    given = parent is not None
    parent = parent or os.getppid()
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            return False
    except (OSError, AttributeError):
        return False  # then torch's own worker watchdog still ends a worker once it notices the parent is gone
    orphaned = parent == 1 and not given and not _in_container()
    if os.getppid() != parent or orphaned:  # the parent died before the request was in place
        os.kill(os.getpid(), sig)
    return True


def make_dataloader(dataset, num_workers, pin_memory, prefetch_factor, persistent_workers=False):
    kw = dict(prefetch_factor=prefetch_factor, worker_init_fn=_ignore_stop_signals,
              persistent_workers=persistent_workers) if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kw)
