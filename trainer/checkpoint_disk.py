"""What every checkpoint format shares on disk (trainer/checkpoint.py: .pt files; trainer/dcp_checkpoint.py and
dcp_save.py: DCP folders): the names in the checkpoint directory, the sidecar beside each checkpoint, the errors,
durable writes (umask, fsync of the folder), the one-line message of a refused write, and the keys of older
checkpoints read in today's spelling (`upgrade`)."""
from __future__ import annotations

import errno
import os
import re
import shutil

from trainer.errors import UserError

NAME = re.compile(r"^step-(\d{9})(\.pt)?$")  # a .pt file or a DCP folder
TMP_PREFIX = ".tmp-"
ENGINE_DIR = "deepspeed"  # an engine's own checkpoint files (DeepSpeed's ZeRO partitions) under the checkpoint dir
class CheckpointError(UserError):
    """A checkpoint file that cannot be used: truncated, garbled, failing its sha256, or not a trainer checkpoint."""


class CheckpointWriteError(UserError):
    """The disk refused a checkpoint (full, read-only, gone); the previous checkpoints are untouched."""


def sidecar(path: str) -> str:
    """step-N.json for step-N.pt or the folder step-N."""
    path = path.rstrip(os.sep)
    return (path[:-len(".pt")] if path.endswith(".pt") else path) + ".json"


def is_folder(path: str) -> bool:
    """True for a DCP checkpoint folder (step-N/), False for a .pt file."""
    return not path.rstrip(os.sep).endswith(".pt")


def upgrade(state: dict) -> dict:
    """`state` (a checkpoint's dict or DCP `trainer` entry) in today's keys, changed in place: the tracking run ids
    of checkpoints written before they were keyed by backend (`mlflow_run_id`: id or None) become
    `tracker_run_ids` ({backend: run id})."""
    if "mlflow_run_id" in state and "tracker_run_ids" not in state:
        run_id = state.pop("mlflow_run_id")
        state["tracker_run_ids"] = {"mlflow": run_id} if run_id else {}
    return state


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: str) -> None:
    """fsync `directory` (a rename in it survives a crash); silently nothing where the OS refuses."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def describe_write_error(e: OSError, path: str, previous: str | None) -> str:
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(os.path.dirname(path)).free
            where = f" ({free / 2**20:.1f} MiB free there)"
        except OSError:
            where = ""
        return (f"checkpoint.dir: no space left on device writing {path}{where}; {kept}. Free space on that disk "
                f"or point checkpoint.dir at another one, then run the same command again to resume.")
    return (f"checkpoint.dir: cannot write {path}: {e.strerror or e} (errno {e.errno}); {kept}. Make the folder "
            f"writable or set checkpoint.dir to one that is.")
