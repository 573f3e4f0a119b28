"""Writing trainer checkpoints as DCP folders (`DCPSaver`): every rank writes its block into a temporary folder,
hashes its files, rank 0 writes the sidecar and publishes the folder by renaming it; optionally in the background
(DCP's async_save on a gloo group of its own). The layout and the reading side are in trainer/dcp_checkpoint.py."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

import collectives
from trainer.checkpoint_disk import (
    TMP_PREFIX,
    CheckpointWriteError,
    current_umask,
    describe_write_error,
    fsync_dir,
    sidecar,
)
from trainer.dcp_checkpoint import METADATA, file_digest, quiet_one_process
from trainer.state_parts import annotate_rows, is_row_block


class _CloneStager:
    """DCP AsyncStager: a CPU clone of every tensor (training may go on), keeping the row annotations."""

    _synchronize_after_execute = False

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def stage(self, state_dict: dict) -> dict:
        out = {}
        for k, v in state_dict.items():
            if torch.is_tensor(v):
                c = v.detach().to("cpu", copy=True)
                if is_row_block(v):
                    marked: Any = v  # DCP's fields, set by annotate_rows
                    annotate_rows(c, marked.global_offsets[0][0], marked.global_shape[0])
                out[k] = c
            else:
                out[k] = v
        return out

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _write_error(e: BaseException) -> OSError | None:
    """The OSError behind a DCP CheckpointException (one per failing rank), if the disk refused."""
    seen = [e]
    while seen:
        x = seen.pop()
        if isinstance(x, OSError):
            return x
        if isinstance(x, tuple):
            seen.extend(y for y in x if isinstance(y, BaseException))
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            for f in failures.values():
                seen.extend(f if isinstance(f, tuple) else (f,))
        for y in (getattr(x, "__cause__", None), getattr(x, "__context__", None)):
            if y is not None:
                seen.append(y)
    return None


class DCPSaver:
    """Saves trainer checkpoints as DCP folders into `checkpointer.dir` (keep-last and names shared with it)."""

    def __init__(self, checkpointer):
        self.ckpt = checkpointer
        self.pending: dict | None = None  # an async save not published yet
        self._pg = None

    def save(self, sd: dict, step: int, meta: dict, async_save: bool = False) -> None:
        """Collective. Write this rank's `sd` (build_state) as step-<step>/; publish it at once, or (async) at
        the next save / wait(). Raises CheckpointWriteError (the same on every rank) when the disk refuses;
        earlier checkpoints stay untouched and the temporary folder is removed."""
        self.wait()
        final = os.path.join(self.ckpt.dir, f"step-{step:09d}")
        tmp = os.path.join(self.ckpt.dir, f"{TMP_PREFIX}step-{step:09d}")
        error = None
        if collectives.rank() == 0:
            try:
                os.makedirs(self.ckpt.dir, exist_ok=True)
                if os.path.lexists(tmp):
                    shutil.rmtree(tmp)
                os.makedirs(tmp)
            except OSError as e:
                error = describe_write_error(e, tmp, self.ckpt.latest())
        error = collectives.broadcast_object(error)
        if error is not None:
            raise CheckpointWriteError(error)
        planner = DefaultSavePlanner(flatten_state_dict=False)
        writer = FileSystemWriter(tmp)
        try:
            if async_save:
                if self._pg is None and collectives.is_distributed():
                    self._pg = dist.new_group(backend="gloo")  # DCP's collectives off the training thread
                with quiet_one_process(self._pg is None):
                    future = dcp.async_save(sd, storage_writer=writer, planner=planner, process_group=self._pg,
                                            async_stager=_CloneStager(), no_dist=self._pg is None)
                self.pending = dict(future=future, tmp=tmp, final=final, step=step, meta=meta)
                return
            with quiet_one_process(not collectives.is_distributed()):
                dcp.save(sd, storage_writer=writer, planner=planner, no_dist=not collectives.is_distributed())
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps each rank's failure (a BaseException)
            self._fail(e, tmp, final)
        self._publish(tmp, final, step, meta)

    def wait(self) -> None:
        """Collective: finish and publish a pending async save (nothing when there is none)."""
        if self.pending is None:
            return
        p, self.pending = self.pending, None
        try:
            p["future"].result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            self._fail(e, p["tmp"], p["final"])
        self._publish(p["tmp"], p["final"], p["step"], p["meta"])

    def _fail(self, e: BaseException, tmp: str, final: str):
        collectives.barrier()  # no rank still writes into the folder
        if collectives.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = _write_error(e)
        if cause is None:
            raise e
        raise CheckpointWriteError(describe_write_error(cause, final, self.ckpt.latest())) from None

    def _publish(self, tmp: str, final: str, step: int, meta: dict) -> None:
        """Each rank hashes its own files; rank 0 writes the sidecar, renames the folder, keeps the last K."""
        rank = collectives.rank()
        mine = {}
        error = None
        try:
            for name in sorted(os.listdir(tmp)):
                if name.startswith(f"__{rank}_") or (rank == 0 and name == METADATA):
                    mine[name] = file_digest(os.path.join(tmp, name))
        except OSError as e:
            error = describe_write_error(e, final, self.ckpt.latest())
        everyone = collectives.all_gather_object((mine, error))
        if rank == 0:
            errors = [e for _, e in everyone if e]
            if not errors:
                files = {k: v for m, _ in everyone for k, v in m.items()}
                try:
                    self._commit(tmp, final, step, meta, files)
                except OSError as e:
                    errors.append(describe_write_error(e, final, self.ckpt.latest()))
            if errors:
                shutil.rmtree(tmp, ignore_errors=True)
            error = errors[0] if errors else None
        error = collectives.broadcast_object(error)
        if error is not None:
            raise CheckpointWriteError(error)

    def _commit(self, tmp: str, final: str, step: int, meta: dict, files: dict) -> None:
        missing = sorted(set(os.listdir(tmp)) - set(files))
        if missing:  # a file no rank claimed: hash it here (e.g. an extra file per thread)
            files.update({name: file_digest(os.path.join(tmp, name)) for name in missing})
        side = dict(format="dcp", files=files, bytes=sum(f["bytes"] for f in files.values()), step=step,
                    epoch=meta.get("epoch"), run_uid=meta.get("run_uid"), world_size=meta.get("world_size"),
                    written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        fd, side_tmp = tempfile.mkstemp(dir=self.ckpt.dir, prefix=TMP_PREFIX, suffix=".json")
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: teammates must read checkpoints too
            with os.fdopen(fd, "w") as f:
                json.dump(side, f)
                f.flush()
                os.fsync(f.fileno())
            if os.path.lexists(final):  # the same step saved again (e.g. a restart that trained nothing)
                shutil.rmtree(final)
            os.replace(side_tmp, sidecar(final))  # the sidecar first: a folder in place always has its digests
            os.replace(tmp, final)  # atomic: readers see the old set or the complete folder
        finally:
            if os.path.exists(side_tmp):
                os.remove(side_tmp)
        fsync_dir(self.ckpt.dir)
        self.ckpt.prune()
