"""Checkpoints: atomic, verified writes; the last K kept; on resume the newest intact one.

A checkpoint holds (docs/architecture.md): config, model, criterion, optimizer, scheduler, epoch, step,
batch_in_epoch, rng, tracker_run_ids, world_size, run_uid, train_classes, train_samples. `epoch` / `batch_in_epoch`
is the data position where training continues: batches `batch_in_epoch..` of epoch `epoch`. Two formats
(`checkpoint.format`); files in the checkpoint directory:

    step-000000042/            dcp: a torch.distributed.checkpoint folder of every rank's shards (dcp_checkpoint.py)
    step-000000042.pt          torch: one torch.save'd dict, written by rank 0
    step-000000042.json        the sidecar: sha256 and bytes (of the file, or of every file in the folder), step,
                               epoch, run_uid; renamed in just before the checkpoint
    step-000000042[.pt].damaged  one that failed to load or verify, moved aside on resume (nothing is deleted)
    .tmp-*                     a write in progress; left behind by a killed write, removed at the next start

A checkpoint is renamed into place only once complete: readers never see half of one.

    ckpt = Checkpointer(run_dir / "checkpoints", keep_last=3)
    ckpt.save(state, step)                # torch format, rank 0 only; CheckpointWriteError when the disk refuses
    path, state = ckpt.find_latest()      # (None, None) when there is none; damaged ones are skipped
    state = load(path)                    # either format, as one dict (a folder: assembled in this process)
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from trainer.checkpoint_disk import (  # the names every checkpoint format shares, here for this file's callers too
    NAME,
    TMP_PREFIX,
    CheckpointError,
    CheckpointWriteError,
    current_umask,
    describe_write_error,
    fsync_dir,
    is_folder,
    sidecar,
    upgrade,
)

REQUIRED = ("config", "model", "criterion", "optimizer", "scheduler", "epoch", "step", "batch_in_epoch", "rng")


class _Digesting:
    """A write-only file wrapper for torch.save: hashes (sha256) and counts what passes, keeps the OSError the
    disk raised (torch reports a failed write as 'unexpected pos ...', without the errno)."""

    def __init__(self, f):
        self.f, self.sha, self.bytes, self.error = f, hashlib.sha256(), 0, None

    def write(self, b) -> int:
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(b)
        self.bytes += len(b)
        return n

    def flush(self):
        self.f.flush()


class Checkpointer:
    def __init__(self, directory: str, keep_last: int = 3):
        self.dir = directory
        self.keep_last = keep_last

    def paths(self) -> list[str]:
        """Existing checkpoints, oldest (lowest step) first."""
        if not os.path.isdir(self.dir):
            return []
        names = sorted((int(m.group(1)), f) for f in os.listdir(self.dir)
                       if (m := NAME.match(f)) and os.path.isdir(os.path.join(self.dir, f)) != bool(m.group(2)))
        return [os.path.join(self.dir, f) for _, f in names]

    def latest(self) -> str | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def clean_temporaries(self) -> list[str]:
        """Remove the temporary files of writes that were killed. Only while no other writer can exist (the run
        directory's lock is held, trainer/run_dir.py)."""
        if not os.path.isdir(self.dir):
            return []
        gone = [os.path.join(self.dir, f) for f in os.listdir(self.dir) if f.startswith(TMP_PREFIX)]
        for path in gone:
            (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
        return gone

    def save(self, state: dict, step: int) -> str:
        """Write `state` as step-<step>.pt (atomically, with its sha256 sidecar), then keep the last K.

        Raises CheckpointWriteError naming the file and the cause (e.g. no space left on device); the earlier
        checkpoints are untouched and no partial file stays behind."""
        path = os.path.join(self.dir, f"step-{step:09d}.pt")
        tmp = side_tmp = None
        try:
            os.makedirs(self.dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=TMP_PREFIX, suffix=".pt")
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: teammates must read checkpoints too
            with os.fdopen(fd, "wb") as f:
                out = _Digesting(f)
                try:
                    torch.save(state, out)  # type: ignore[arg-type]  # a write-only file: torch calls write, flush
                except RuntimeError as e:  # torch hides the disk's errno behind "unexpected pos"
                    if out.error is not None:
                        raise out.error from e
                    raise
                f.flush()
                os.fsync(f.fileno())
            meta = dict(sha256=out.sha.hexdigest(), bytes=out.bytes, step=step, epoch=state.get("epoch"),
                        run_uid=state.get("run_uid"), written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            fd, side_tmp = tempfile.mkstemp(dir=self.dir, prefix=TMP_PREFIX, suffix=".json")
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(side_tmp, sidecar(path))  # the sidecar first: a .pt in place always has its digest
            os.replace(tmp, path)  # atomic: a reader sees the old set or the new file, never half of it
            fsync_dir(self.dir)
        except OSError as e:
            for t in (tmp, side_tmp):
                if t and os.path.exists(t):
                    os.remove(t)
            raise CheckpointWriteError(describe_write_error(e, path, self.latest())) from None
        except BaseException:
            for t in (tmp, side_tmp):
                if t and os.path.exists(t):
                    os.remove(t)
            raise
        self.prune()
        return path

    def prune(self) -> None:
        """Delete all but the last `keep_last` checkpoints (files or folders) and their sidecars."""
        for old in self.paths()[:-self.keep_last]:
            (shutil.rmtree if os.path.isdir(old) else os.remove)(old)
            if os.path.exists(sidecar(old)):
                os.remove(sidecar(old))

    def find_latest(self, log=None, check=None) -> tuple[str | None, dict | None]:
        """The newest checkpoint that loads and verifies, and its state; (None, None) if there is none.

        `check(state)` may raise CheckpointError for more (e.g. DeepSpeed's folder beside it is missing). A DCP folder
        without a sidecar (no sha256 to check its files against) is loaded in full here, once. Each damaged one met
        on the way (truncated, garbled, failing its sha256, its full load or `check`) is reported through `log`
        (or warnings.warn), naming the file and why, and renamed to <name>.damaged so that it can neither be picked
        again nor outrank good checkpoints in keep-last. When every checkpoint is damaged, CheckpointError: the
        run is not silently started over, nor at the next start (the damaged ones are still there). Rank 0 only
        (the others load the path it picks).
        For a DCP folder, `state` is its small `trainer` entry (dcp_checkpoint.read_meta): the tensors are loaded
        later, by every rank, for its own share."""
        damaged = []
        for path in reversed(self.paths()):
            try:
                if is_folder(path):
                    from trainer import dcp_checkpoint
                    dcp_checkpoint.verify(path)
                    state = dcp_checkpoint.read_meta(path)
                    if not os.path.exists(sidecar(path)):  # nothing vouches for its tensors: read them all once
                        dcp_checkpoint.load_consolidated(path)
                else:
                    state = load(path)
                if check is not None:
                    check(state)
                return path, state
            except CheckpointError as e:
                aside = path + ".damaged"
                try:
                    os.replace(path, aside)
                    if os.path.exists(sidecar(path)):
                        os.replace(sidecar(path), sidecar(path)[:-len(".json")] + ".json.damaged")
                except OSError as err:
                    raise CheckpointWriteError(f"checkpoint.dir: {e}; it cannot be moved aside ({err.strerror}): make "
                                               f"{self.dir} writable, or move it away yourself") from None
                damaged.append(aside)
                msg = f"warning: skipping a damaged checkpoint ({e}); moved to {aside}; trying an older one"
                log(msg) if log else warnings.warn(msg, stacklevel=2)
        damaged += self.set_aside(exclude=damaged)  # found damaged by an earlier start: still nothing to resume
        if damaged:
            raise CheckpointError(f"every checkpoint in {self.dir} is damaged (moved to {', '.join(damaged)}); "
                                  f"nothing to resume. To start over anyway: checkpoint.resume=false (moves this run "
                                  f"to previous/), or another run.name=...")
        return None, None

    def set_aside(self, exclude: Sequence[str] = ()) -> list[str]:
        """The checkpoints moved aside as damaged (step-N[.pt].damaged) in the checkpoint directory, but `exclude`."""
        if not os.path.isdir(self.dir):
            return []
        return [os.path.join(self.dir, f) for f in sorted(os.listdir(self.dir))
                if f.endswith(".damaged") and NAME.match(f[:-len(".damaged")])
                and os.path.join(self.dir, f) not in exclude]

    def load_latest(self) -> dict | None:
        """The newest intact checkpoint as one dict (a DCP folder assembled in this process), or None."""
        path, state = self.find_latest()
        return load(path) if path is not None and is_folder(path) else state


def verify(path: str) -> None:
    """Check `path` against its sidecar (size and sha256). Checkpoints without a sidecar (older versions) pass.
    Raises CheckpointError naming the file."""
    side = sidecar(path) if NAME.match(os.path.basename(path)) else None
    if not side or not os.path.exists(side):
        return
    try:
        with open(side) as f:
            meta = json.load(f)
        want_sha, want_bytes = meta["sha256"], meta["bytes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{side}: unreadable sidecar ({e})") from None
    size = os.path.getsize(path)
    if size != want_bytes:
        raise CheckpointError(f"{path}: {size} bytes, its sidecar says {want_bytes} (truncated or overwritten)")
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    if sha.hexdigest() != want_sha:
        raise CheckpointError(f"{path}: sha256 differs from the one written with it (the file is damaged)")


def load(path: str, check_keys: bool = True, model_only: bool = False) -> dict:
    """A trainer checkpoint (a step-N.pt file or a step-N/ DCP folder) as a dict (tensors on the CPU), verified
    against its sidecar. A folder is assembled in this process (full proxy table included; `model_only`: only
    config, position and model, e.g. for evaluation).

    Raises CheckpointError naming `path` when it is missing, truncated, garbled, fails its digest or is not a
    trainer checkpoint (with `check_keys`: a dict with the keys every trainer checkpoint has)."""
    if os.path.isdir(path):
        from trainer import dcp_checkpoint
        dcp_checkpoint.verify(path)
        state = dcp_checkpoint.load_consolidated(path, model_only=model_only)
        missing = [k for k in REQUIRED if k not in state] if check_keys and not model_only else []
        if missing:
            raise CheckpointError(f"{path}: not a trainer checkpoint (no {', '.join(missing)})")
        return upgrade(state)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    verify(path)
    from trainer.safe_load import UnsafeFileError, torch_load
    try:
        state = torch_load(path)  # tensors and plain data only: a file that would run code is refused
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - unpickling garbage raises anything from EOFError to UnicodeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None
    if check_keys:
        missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
        if missing:
            raise CheckpointError(f"{path}: not a trainer checkpoint (no {', '.join(missing)})")
    return upgrade(state) if isinstance(state, dict) else state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
