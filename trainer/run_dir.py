"""A run directory belongs to one run at a time: a lock for its life, and starting over archives what was there.

    claim = RunDir(run_dir, ckpt_dir).claim()   # rank 0; RunDirBusy when another live trainer holds it
    claim.archive_previous()                    # checkpoint.resume=false: move the old run aside (nothing deleted)
    claim.release()

The lock is `fcntl.flock` on <run_dir>/.lock, held by rank 0 for the whole run: the kernel drops it when the
process dies however it dies (SIGKILL included), so the lock of a dead trainer is never stale. The file also
says who holds it (host, pid, start time) for the message a second trainer prints. On NFS, flock is mapped to
POSIX byte-range locks (Linux >= 2.6.12), which the server keeps as long as the holder's client lives.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import time

from trainer.checkpoint_disk import ENGINE_DIR
from trainer.errors import UserError

LOCK_NAME = ".lock"
ARCHIVE_DIR = "previous"
RUN_FILES = ("config.yaml", "summary.json")  # what a run keeps in its directory besides checkpoints and tracking
# step-N.pt, step-N.json, *.damaged; best.pt (the best val checkpoint, trainer/selection.py); DeepSpeed's folder
CHECKPOINT_PREFIXES = ("step-", "best.pt", ENGINE_DIR)


class RunDirError(UserError):
    """The run directory cannot be used: not writable, or held by another trainer."""


class RunDir:
    def __init__(self, run_dir: str, ckpt_dir: str):
        self.run_dir, self.ckpt_dir = run_dir, ckpt_dir
        self._fds: list[int] = []

    def claim(self) -> RunDir:
        """Create the run directory and the checkpoint directory, check that the latter is writable, and lock both
        (a checkpoint.dir outside the run directory could be shared by two runs). Raises RunDirError naming the
        directory and the key, and, when another trainer holds it, that trainer's host, pid and start time."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"run.output_dir: cannot create the run directory {self.run_dir} ({e.strerror}); "
                              f"choose a writable run.output_dir (or run.name)") from None
        self._lock(self.run_dir, "run.name", "run directory")
        try:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.ckpt_dir, prefix=".tmp-probe-")
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            self.release()
            raise RunDirError(f"checkpoint.dir: cannot write checkpoints into {self.ckpt_dir} ({e.strerror}); make "
                              f"it a writable folder or set checkpoint.dir to one (nothing was trained)") from None
        inside = os.path.realpath(self.ckpt_dir) + os.sep
        if not inside.startswith(os.path.realpath(self.run_dir) + os.sep):  # elsewhere: other runs could share it
            self._lock(self.ckpt_dir, "checkpoint.dir", "checkpoint directory")
        return self

    def _lock(self, folder: str, key: str, what: str) -> None:
        try:
            fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self.release()
            raise RunDirError(f"{key}: cannot create the lock file {os.path.join(folder, LOCK_NAME)} in the {what} "
                              f"({e.strerror}); make {folder} writable or choose another {key}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            self.release()
            raise RunDirError(f"{key}: the {what} {folder} is in use by another trainer ({holder}); wait for it to "
                              f"end or stop it, or start this run under another {key}=...") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dict(host=socket.gethostname(), pid=os.getpid(),
                                      since=time.strftime("%Y-%m-%d %H:%M:%S %Z"))).encode(), 0)
        self._fds.append(fd)

    def release(self) -> None:
        while self._fds:
            fd = self._fds.pop()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def previous_run(self) -> list[str]:
        """What an earlier run left: its config.yaml, summary.json and checkpoints (step-* files and sidecars,
        damaged ones, DeepSpeed's folder), where they exist."""
        found = [p for p in (os.path.join(self.run_dir, f) for f in RUN_FILES) if os.path.isfile(p)]
        if os.path.isdir(self.ckpt_dir):
            found += [os.path.join(self.ckpt_dir, f) for f in sorted(os.listdir(self.ckpt_dir))
                      if f.startswith(CHECKPOINT_PREFIXES)]
        return found

    def archive_previous(self) -> str | None:
        """Move an earlier run's files (previous_run()) to <run_dir>/previous/<UTC time>/, the checkpoints into its
        checkpoints/ (on the same disk: renames). Returns that folder, or None when there was nothing. Works when
        checkpoint.dir is the run directory itself. Needs the lock."""
        assert self._fds, "claim() the run directory first"
        found = self.previous_run()
        if not found:
            return None
        dest = os.path.join(self.run_dir, ARCHIVE_DIR, time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
        while os.path.exists(dest):
            dest += "+"
        os.makedirs(os.path.join(dest, "checkpoints"))
        for path in found:
            into = dest if os.path.dirname(path) == self.run_dir and os.path.basename(path) in RUN_FILES else \
                os.path.join(dest, "checkpoints")
            shutil.move(path, os.path.join(into, os.path.basename(path)))  # a rename on one disk
        return dest


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
