"""Reading files that may come from elsewhere without running code: a checkpoint (.pt file or DCP folder), a
DeepSpeed checkpoint folder, a consolidated export. Pickle can call any function while it loads; these readers
accept tensors, plain data (dict, list, tuple, str, numbers, None) and an allow-list of types the trainer's own
files hold (numpy arrays of the RNG state, DCP's metadata classes, DeepSpeed's loss scaler and ZeRO records),
and refuse anything else in one line naming the file and the Python object it wanted, before calling it.

    state = torch_load(path)                 # torch.load(weights_only=True) with the allow-list; UnsafeFileError
    obj = torch_load(io.BytesIO(b), what=...)   # bytes inside a DCP folder
    check_torch_files(folder)                # every *.pt under a folder (DeepSpeed's), before DeepSpeed loads it
    reader = SafeFileSystemReader(folder)    # DCP's FileSystemReader whose .metadata is read by a restricted
    planner = SafeLoadPlanner(...)           #   unpickler; DefaultLoadPlanner whose bytes entries load weights_only

UnsafeFileError is a CheckpointError (a UserError: one line, exit status 2).
"""
from __future__ import annotations

import io
import os
import pickle
import re

import numpy as np
import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

from trainer.errors import UserError


class UnsafeFileError(UserError):
    """A file that needs more than tensors and plain data to load (loading it could run code): not loaded."""


def _numpy_globals() -> list:
    """What numpy arrays (the RNG state) and their dtypes unpickle through, under numpy 2's and numpy 1's names."""
    rebuild = (np._core.multiarray._reconstruct if hasattr(np, "_core")
               else np.core.multiarray._reconstruct)  # type: ignore[attr-defined]  # numpy 1's name, not in numpy 2's stubs
    dtypes = {type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.bool_)}
    return [rebuild, (rebuild, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, *dtypes]


def _deepspeed_globals() -> list:
    """DeepSpeed's own records in its ZeRO optimizer files (loss scaler, stage, fragment addresses)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_SAFE: list | None = None


def safe_globals() -> list:
    """The allow-list for torch.load(weights_only=True), beyond torch's own tensors and plain data."""
    global _SAFE
    if _SAFE is None:
        _SAFE = _numpy_globals() + _deepspeed_globals()
    return _SAFE


def refusal(name: str, why: str) -> str:
    return (f"{name}: not loaded: it holds {why}, which could run code while loading; only tensors and plain "
            f"data are read (checkpoints this trainer writes). Use a file from a source you trust, written by "
            f"this trainer")


def blocked_object(e: Exception) -> str | None:
    """The Python object a weights_only load refused, from torch's message (None: another failure)."""
    msg = str(e)
    if "Weights only load failed" not in msg and "weights_only" not in msg:
        return None
    m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"global (\S+)", msg)
    if m:
        return f"the Python object {m.group(1)}"
    m = re.search(r"Unsupported operand (\d+)", msg)
    return (f"pickle instructions beyond tensors and plain data (opcode {m.group(1)})" if m
            else "Python objects beyond tensors and plain data")


def torch_load(f, what: str | None = None, mmap: bool = False):
    """torch.load(f, weights_only=True) with the allow-list, on the CPU. `what` names the file in errors
    (default: f itself). Raises UnsafeFileError when the file needs anything else; other failures (a truncated or
    garbled file) propagate as torch raises them."""
    name = what or str(f)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        blocked = blocked_object(e)
        if blocked is None:
            raise
        raise UnsafeFileError(refusal(name, blocked)) from None


def check_torch_files(folder: str) -> None:
    """Every *.pt file under `folder` (DeepSpeed's checkpoint folders) loads with the allow-list (memory-mapped:
    nothing is copied); run before a library that loads them with full pickle. Raises UnsafeFileError."""
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            if f.endswith(".pt"):
                path = os.path.join(root, f)
                try:
                    torch_load(path, mmap=True)
                except UnsafeFileError:
                    raise
                except Exception:  # noqa: BLE001 - damage is the loader's to report; this check is about code
                    pass


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata: the classes of torch.distributed.checkpoint's metadata and storage records, torch.Size,
    dtypes, layouts, memory formats, paths; nothing else."""

    MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
               "torch.distributed.checkpoint._extension"}
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
             ("pathlib", "PurePosixPath"), ("pathlib", "Path"), ("collections", "OrderedDict"),
             ("builtins", "set"), ("builtins", "frozenset"), ("torch", "layout"), ("torch", "memory_format")}

    def find_class(self, module: str, name: str):
        if module in self.MODULES and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type):  # records and enums; no functions of those modules
                return obj
        elif (module, name) in self.NAMES:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def read_dcp_metadata(path: str):
    """DCP's Metadata of folder `path`, through the restricted unpickler. Raises UnsafeFileError (it wanted
    another object), or what reading or unpickling raised."""
    file = os.path.join(path, ".metadata")
    with open(file, "rb") as f:
        try:
            md = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            if str(e).startswith("GLOBAL "):
                raise UnsafeFileError(refusal(file, f"the Python object {str(e)[len('GLOBAL '):]}")) from None
            raise
    from torch.distributed.checkpoint.metadata import Metadata
    if not isinstance(md, Metadata):
        raise UnsafeFileError(f"{file}: not DCP metadata (a {type(md).__name__})")
    return md


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader (whose tensors torch already loads weights_only) with a restricted .metadata unpickler."""

    def read_metadata(self, *args, **kwargs):
        if kwargs.get("rank") is not None:  # per-rank metadata files: not written by this trainer
            raise UnsafeFileError(f"{self.path}: per-rank DCP metadata is not read")
        md = read_dcp_metadata(str(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose bytes entries (non-tensor values) load weights_only, with the allow-list."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = torch_load(value, what=f"the entry {fqn!r} of a DCP checkpoint")
        if self.flatten_state_dict:  # not used by the trainer (flatten off); as DefaultLoadPlanner does
            from torch.distributed.checkpoint._traverse import set_element
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
