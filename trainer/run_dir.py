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
import time

from trainer.errors import UserError

LOCK_NAME = ".lock"
ARCHIVE_DIR = "previous"


class RunDirError(UserError):
    """The run directory cannot be used: not writable, or held by another trainer."""


class RunDir:
    def __init__(self, run_dir: str, ckpt_dir: str):
        self.run_dir, self.ckpt_dir = run_dir, ckpt_dir
        self._fd: int | None = None

    def claim(self) -> RunDir:
        """Create the directory and take its lock. Raises RunDirError naming the directory, and, when another
        trainer holds it, that trainer's host, pid and start time."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(os.path.join(self.run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"run.output_dir: cannot create the run directory {self.run_dir} ({e.strerror}); "
                              f"choose a writable run.output_dir (or run.name)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(f"run.name: the run directory {self.run_dir} is in use by another trainer ({holder}); "
                              f"wait for it to end or stop it, or start this run under another run.name=...") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dict(host=socket.gethostname(), pid=os.getpid(),
                                      since=time.strftime("%Y-%m-%d %H:%M:%S %Z"))).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def previous_run(self) -> list[str]:
        """What an earlier run left: its config.yaml and its checkpoint folder, where they exist and hold anything."""
        found = []
        cfg = os.path.join(self.run_dir, "config.yaml")
        if os.path.isfile(cfg):
            found.append(cfg)
        if os.path.isdir(self.ckpt_dir) and os.listdir(self.ckpt_dir):
            found.append(self.ckpt_dir)
        return found

    def archive_previous(self) -> str | None:
        """Move an earlier run's config.yaml and checkpoint folder to <run_dir>/previous/<UTC time>/ (on the same
        disk: a rename). Returns that folder, or None when there was nothing. Needs the lock."""
        assert self._fd is not None, "claim() the run directory first"
        found = self.previous_run()
        if not found:
            return None
        dest = os.path.join(self.run_dir, ARCHIVE_DIR, time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
        while os.path.exists(dest):
            dest += "+"
        os.makedirs(dest)
        for path in found:
            shutil.move(path, os.path.join(dest, os.path.basename(path.rstrip(os.sep))))  # a rename on one disk
        return dest


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
