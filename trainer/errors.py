"""Expected user errors, and how a failing process ends: one line for a user error, a traceback for a bug,
then every process exits non-zero at once (its loader workers killed), so torchrun can restart or fail the job.

A `UserError` means the input is wrong (a config key, a data folder, a checkpoint file, a disk), never a bug:
its message names the input and the way out. `data_shards.DataError` is one too (data_shards imports nothing
from trainer). Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import traceback
from typing import NoReturn

from data_shards.errors import DataError, StoreUnavailable

EXIT_USER_ERROR = 2  # as argparse: the command line or its inputs are wrong
EXIT_BUG = 1


class UserError(Exception):
    """A wrong input, told in words: the message names the input (a config key, a path) and the fix.
    `same_on_every_rank`: set on an error decided on rank 0 and raised on every rank (only rank 0 prints it)."""

    same_on_every_rank: bool = False


USER_ERRORS = (UserError, DataError)


class StalledPeer(Exception):
    """A collective waited past run.collective_timeout_s; the message names the rank and what it was doing
    (trainer/distributed.py: describe_stall)."""


# Errors of libraries we do not own are told apart by their wording, here only.
# torch.distributed raises a RuntimeError / DistBackendError on a rank whose peer died: gloo's TCP connection to it
# closes, resets or times out; NCCL's watchdog (ProcessGroupNCCL) aborts the communicator.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "ProcessGroupNCCL", "Socket Timeout", "connection was closed", "Timed out")
# A collective or the rendezvous store giving up after the process group's timeout (either backend, TCPStore).
TIMED_OUT = ("Timed out", "timed out", "Timeout", "timeout")
# A training step on weights that are no longer finite: torch's scalar conversion (c10: "value cannot be converted
# to type float without overflow", an optimizer step), torch.nn.utils.clip_grad_norm_ ("... is non-finite, so it
# cannot be clipped"); our own criteria raise loss.criterion.NonFiniteEmbeddings.
DIVERGED = ("non-finite", "without overflow")


def is_peer_failure(e: BaseException) -> bool:
    """True when `e` is a collective failing because another rank is gone (not this rank's own error)."""
    import torch.distributed as dist
    return isinstance(e, (RuntimeError, dist.DistBackendError)) and any(s in str(e) for s in PEER_GONE)


def is_collective_timeout(e: BaseException) -> bool:
    """True when `e` is a collective (or the store) giving up after the process group's timeout."""
    import torch.distributed as dist
    return isinstance(e, (RuntimeError, dist.DistBackendError)) and any(s in str(e) for s in TIMED_OUT)


def is_divergence(e: BaseException) -> bool:
    """True when `e`, raised by a training step, means the weights or the loss are no longer finite."""
    from loss.criterion import NonFiniteEmbeddings
    return isinstance(e, NonFiniteEmbeddings) or (
        isinstance(e, (ValueError, RuntimeError)) and any(s in str(e) for s in DIVERGED))


def report(e: BaseException, rank: int = 0, world_size: int = 1, quiet_ranks: bool = False) -> int:
    """Print `e` for the user and return the exit status.

    UserError / DataError: `error: <message>` (1-2 lines, no traceback), status 2; StoreUnavailable (an object
    store down after every retry): one line, status 1; with `quiet_ranks`, or an
    error marked `same_on_every_rank` (decided on rank 0, raised everywhere), only rank 0 prints it. A collective
    that failed because a peer died: one line, status 1. KeyboardInterrupt: status 130. Anything else is a bug:
    its traceback, status 1.
    """
    from trainer.redact import redact  # no credential reaches the terminal, whatever the message quotes
    tag = f"[rank {rank}] " if world_size > 1 else ""
    if isinstance(e, USER_ERRORS):
        if rank == 0 or not (quiet_ranks or getattr(e, "same_on_every_rank", False)):
            print(redact(f"{tag}error: {one_line(e)}"), file=sys.stderr)
        return EXIT_USER_ERROR
    if isinstance(e, KeyboardInterrupt):
        print(f"{tag}interrupted: stopped at once, without a checkpoint since the last one", file=sys.stderr)
        return 130
    if isinstance(e, StoreUnavailable):  # the object store kept failing after its retries: not a bug, not the data
        print(f"{tag}error: {one_line(e)}", file=sys.stderr)
        return EXIT_BUG
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else EXIT_BUG
    if isinstance(e, PeerFailed):
        print(redact(f"{tag}stopped: {e}"), file=sys.stderr)
        return EXIT_BUG
    if isinstance(e, StalledPeer):  # a collective timed out, the rank it waited on named
        print(redact(f"{tag}error: {e}"), file=sys.stderr)
        return EXIT_BUG
    if world_size > 1 and is_peer_failure(e):
        first = str(e).strip().splitlines()[0][:300]
        print(redact(f"{tag}stopped: another rank failed first (see its error above); here: {first}"),
              file=sys.stderr)
        return EXIT_BUG
    print(redact("".join(traceback.format_exception(e))), end="", file=sys.stderr)
    return EXIT_BUG


class PeerFailed(Exception):
    """This rank stops because another rank failed in a collective part (its error is printed there): one line,
    status 1."""


class OutOfMemory(UserError):
    """A batch did not fit in the device's (or the host's) memory: the message names the keys to lower."""


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's refusal (a RuntimeError)."""
    import torch
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower()))


def out_of_memory(e: BaseException, images, where: str, keys: str) -> OutOfMemory:
    """The one-line OutOfMemory for `e`, met on a batch `images` (B, C, H, W) while `where`; `keys`: what to lower."""
    shape = tuple(getattr(images, "shape", ()))
    batch = f"a batch of {shape[0]} images of {shape[-2]}x{shape[-1]} px" if len(shape) == 4 else "a batch"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = first.split("DefaultCPUAllocator: ")[-1][:160]
    return OutOfMemory(f"out of memory {where} with {batch} on this rank ({first}); lower {keys}")


def one_line(e: BaseException) -> str:
    """The message of `e`; for an error a DataLoader worker raised (its message carries the worker's traceback),
    the original message alone."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if last.startswith(type(e).__name__ + ": ") else last
    return msg


def kill_children() -> None:
    """SIGKILL this process's multiprocessing children (DataLoader workers ignore SIGTERM by design)."""
    for child in multiprocessing.active_children():
        try:
            child.kill()
            child.join(timeout=5)
        except (OSError, ValueError, AssertionError):
            pass


def exit_now(code: int) -> NoReturn:
    """End the process with `code` right away: loader workers killed, output flushed, no interpreter teardown
    (which waits for workers and for peers in a process group that may be gone)."""
    kill_children()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def stop_with_launcher() -> bool:
    """Under torchrun (TORCHELASTIC_RUN_ID set): ask the kernel for SIGTERM when the launcher dies (Linux prctl
    PR_SET_PDEATHSIG), so that a launcher killed with SIGKILL (OOM killer, `kill -9`, a lost node agent) does
    not leave its trainers training on as orphans: they checkpoint and exit as on any SIGTERM. Not for a plain
    `python -m trainer`, whose parent is a shell that may end (nohup) while the run goes on. Returns whether
    it was set up."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    import signal

    from data_shards.workers import die_with_parent
    launcher = int(os.environ.get(LAUNCHER_PID_ENV, "0")) or None  # launch/torchrun.py sets it: exact, even
    return die_with_parent(signal.SIGTERM, parent=launcher)     # when the launcher died before this line


LAUNCHER_PID_ENV = "PROXYGML_LAUNCHER_PID"
