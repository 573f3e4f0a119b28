"""Trainer checkpoints through torch.distributed.checkpoint (DCP): every rank writes its own block of the sharded
proxies, replicated state is written once, and a load re-shards to the world size at hand.

    sd = build_state(meta, parts, rank)                 # this rank's flat DCP dict of the state parts
    saver = DCPSaver(checkpointer)                      # one per trainer (trainer/dcp_save.py)
    saver.save(sd, step, meta, async_save=False)        # collective; CheckpointWriteError when the disk refuses
    saver.wait()                                        # collective: finish a pending async save (publish it)
    meta = read_meta(path)                              # config, position, rng, ... (small; any process)
    local = load_train_state(path, parts)               # collective: {part key: this rank's share}
    state = load_consolidated(path)                     # one process: the .pt layout (tools, tests, evaluate)

On disk (checkpoint.format=dcp; names in trainer/checkpoint_disk.py):

    step-000000042/            .metadata + __<rank>_0.distcp per rank (DCP's FileSystemWriter, fsynced)
    step-000000042.json        sidecar: size and sha256 of every file in the folder, step, epoch, run_uid

Every rank writes into `.tmp-step-000000042/`; once DCP has returned on every rank (its .metadata is written by
rank 0 after all ranks' data), each rank hashes its own files, rank 0 writes the sidecar and renames the folder
to `step-000000042/`: a checkpoint counts only once complete. With `async_save` the write runs in a background
thread (DCP's async_save on a gloo group of its own, a clone of this rank's tensors staged first) and is
published at the next save or `wait()`.

Keys of the flat DCP state dict (flatten off): `trainer` (config, position, every rank's RNG state, ids) and
each state part's entries `<dcp_prefix>/<name>` (trainer/state_parts.py): `model/<k>`, `model/other` (embedder),
`criterion/<k>`, `optim/<param fqn>/<k>` (tensors of the optimizer state), `optim/param_groups`, `optim/other`,
`optim/engine` (DeepSpeed's reference), `scheduler`. A row block (the rows of a table the criterion declares cut,
`sharded_rows()`, and of the optimizer state shaped like it) is this rank's rows [start, stop) of the (total,
...) table, described to DCP by the `CheckpointableTensor` fields (state_parts.annotate_rows), so that blocks
of any size and offset are stored as chunks of one global tensor; everything else is contributed by rank 0
only (rank 0's values, like the .pt checkpoint).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

import collectives
from trainer.checkpoint_disk import (
    CheckpointError,
    sidecar,
    upgrade,
)
from trainer.safe_load import SafeFileSystemReader, SafeLoadPlanner, UnsafeFileError, read_dcp_metadata, torch_load
from trainer.state_parts import StatePart, annotate_rows, is_row_block, plain, state_parts

METADATA = ".metadata"
SAVED_BEFORE_THE_LIST = ("model", "criterion", "optimizer", "scheduler")  # checkpoints without `state_parts`


class Blob:
    """A picklable object as one DCP bytes entry (DCP's Stateful protocol: loaded in place). The object is
    serialised here (torch.save) because DCP drops empty dicts and lists found inside state dicts."""

    def __init__(self, value=None):
        self.value = value

    def state_dict(self) -> dict:
        buf = io.BytesIO()
        torch.save(self.value, buf)
        return {"value": buf.getvalue()}

    def load_state_dict(self, sd: dict) -> None:
        self.value = torch_load(io.BytesIO(sd["value"]), what="a DCP checkpoint's entry")


def entry_key(prefix: str, name: str) -> str:
    """The DCP key of a state part's entry `name` ("" : the part's whole state as one entry `prefix`)."""
    return f"{prefix}/{name}" if name else prefix


def _split(key: str, prefixes) -> tuple[str, str] | None:
    """(prefix, name) of DCP key `key` among `prefixes`, or None."""
    for prefix in prefixes:
        if key == prefix:
            return prefix, ""
        if key.startswith(prefix + "/"):
            return prefix, key[len(prefix) + 1:]
    return None


# ----------------------------------------------------------------------------------------------- building

def build_state(meta: dict, parts: dict[str, StatePart], rank: int) -> dict:
    """This rank's flat DCP state dict (see the module docstring): every part's `local_state()` as entries (a
    collective where a part's is, e.g. DeepSpeed's optimizer); row blocks from every rank, the rest from rank 0."""
    sd: dict = {"trainer": Blob(meta)} if rank == 0 else {}
    for part in parts.values():
        for name, v in part.entries(part.local_state()).items():
            if is_row_block(v):
                sd[entry_key(part.dcp_prefix, name)] = v
            elif rank == 0:
                sd[entry_key(part.dcp_prefix, name)] = v if torch.is_tensor(v) else Blob(v)
    return sd


# ------------------------------------------------------------------------------------------------ checking

def file_digest(path: str) -> dict:
    """{"bytes": size, "sha256": hex digest} of file `path`."""
    sha, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            n += len(chunk)
    return {"bytes": n, "sha256": sha.hexdigest()}


def verify(path: str) -> None:
    """Check folder `path` against its sidecar (every file's size and sha256) and that DCP's .metadata reads.
    Raises CheckpointError naming the folder and the file."""
    side = sidecar(path)
    if os.path.exists(side):
        try:
            with open(side) as f:
                files = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{side}: unreadable sidecar ({e})") from None
        for name, want in files.items():
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise CheckpointError(f"{path}: {name} is missing")
            size = os.path.getsize(file)
            if size != want["bytes"]:
                raise CheckpointError(f"{file}: {size} bytes, its sidecar says {want['bytes']} (truncated or "
                                      f"overwritten)")
            if file_digest(file)["sha256"] != want["sha256"]:
                raise CheckpointError(f"{file}: sha256 differs from the one written with it (the file is damaged)")
    metadata(path)


def metadata(path: str):
    """DCP's Metadata of folder `path`; CheckpointError when it is missing or unreadable."""
    if not os.path.isfile(os.path.join(path, METADATA)):
        raise CheckpointError(f"{path}: no {METADATA} (not a complete DCP checkpoint)")
    try:
        return read_dcp_metadata(path)  # a restricted unpickler: DCP's records only, nothing that runs code
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - unpickling garbage raises anything
        raise CheckpointError(f"{path}: unreadable {METADATA} ({type(e).__name__}: {str(e)[:160]})") from None


@contextlib.contextmanager
def quiet_one_process(no_dist: bool):
    """Around a DCP save or load: without the UserWarning torch gives on every one-process save and load
    ("assuming the intent is to save/load in a single process"), even one asked for by ``no_dist``."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or "
                                    r"uninitialized, assuming the intent is to (save|load) in a single process")
        yield


def _load(path: str, target: dict, no_dist: bool) -> None:
    try:
        planner = SafeLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
        no_dist = no_dist or not collectives.is_distributed()
        with quiet_one_process(no_dist):
            dcp.load(target, storage_reader=SafeFileSystemReader(path), planner=planner, no_dist=no_dist)
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps each rank's failure (a BaseException)
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None


def _blobs(md, keys) -> dict:
    return {k: Blob() for k in keys if isinstance(md.state_dict_metadata.get(k), BytesStorageMetadata)}


def read_meta(path: str) -> dict:
    """The `trainer` entry of folder `path` (config, epoch, step, batch_in_epoch, rng, tracker_run_ids, world_size,
    run_uid, train_classes, train_samples, ...) with `format`="dcp", `path` and `optimizer` (DeepSpeed's reference,
    else None: the optimizer's tensors are loaded with the rest); one process, reads only those entries."""
    md = metadata(path)
    target = _blobs(md, ["trainer", "optim/engine"])
    if "trainer" not in target:
        raise CheckpointError(f"{path}: not a trainer checkpoint (no trainer entry)")
    _load(path, target, no_dist=True)
    engine = target["optim/engine"].value if "optim/engine" in target else None  # DeepSpeed's reference
    return upgrade({**target["trainer"].value, "optimizer": engine, "format": "dcp", "path": path})


def _full_targets(md, keys) -> dict:
    out = {}
    for k in keys:
        m = md.state_dict_metadata[k]
        out[k] = Blob() if isinstance(m, BytesStorageMetadata) else torch.empty(m.size, dtype=m.properties.dtype)
    return out


def load_train_state(path: str, parts: dict[str, StatePart], saved: tuple | list = SAVED_BEFORE_THE_LIST) -> dict:
    """Collective: {part key: this rank's share} from folder `path`, on any world size, each as the part's
    `from_entries` makes it (row blocks cut for this rank by `block_of`, never the whole table; the optimizer's
    ids in the current parameter order). `saved`: the keys of the parts it was saved with (its `trainer` entry's
    `state_parts`); a part of this run not among them is left out. Entries of no part of this run are not read.
    Raises CheckpointError."""
    md = metadata(path)
    by_prefix = {p.dcp_prefix: p for p in parts.values()}
    target: dict = {}
    for k, m in md.state_dict_metadata.items():
        where = _split(k, by_prefix)
        if where is None:
            continue
        rows = None if isinstance(m, BytesStorageMetadata) else by_prefix[where[0]].block_of(where[1], tuple(m.size))
        if isinstance(m, BytesStorageMetadata):
            target[k] = Blob()
        elif rows is not None:
            start, stop, total = rows
            target[k] = annotate_rows(torch.empty((stop - start, *m.size[1:]), dtype=m.properties.dtype), start,
                                      total)
        else:
            target[k] = torch.empty(m.size, dtype=m.properties.dtype)
    _load(path, target, no_dist=False)
    entries = _by_part(target, by_prefix)
    return {p.key: p.from_entries(entries.get(prefix, {}), p) for prefix, p in by_prefix.items()
            if p.key in saved or prefix in entries}


def _by_part(loaded: dict, prefixes) -> dict[str, dict]:
    """{prefix: {name: value}} of loaded DCP entries (Blobs unwrapped, row marks removed)."""
    out: dict = {}
    for k, v in loaded.items():
        where = _split(k, prefixes)
        if where is not None:
            out.setdefault(where[0], {})[where[1]] = v.value if isinstance(v, Blob) else plain(v)
    return out


def load_consolidated(path: str, model_only: bool = False) -> dict:
    """The checkpoint in folder `path` as one dict of the .pt layout (full tensors, on the CPU), read by this
    process alone: the `trainer` entry's keys and each registered state part's whole state under its key (the
    entries of a part not registered now, as saved, under their prefix). `model_only`: config, position and
    model, without proxies and optimizer (evaluation)."""
    md = metadata(path)
    keys = [k for k in md.state_dict_metadata
            if not model_only or k in ("trainer", "model/other") or k.startswith("model/")]
    target = _full_targets(md, keys)
    _load(path, target, no_dist=True)
    meta = target.pop("trainer").value if "trainer" in target else {}
    known = {cls.dcp_prefix: cls for cls in state_parts().values()}
    by_part = _by_part(target, set(known) | {k.split("/", 1)[0] for k in target})
    saved = ("model",) if model_only else meta.get("state_parts", SAVED_BEFORE_THE_LIST)
    out = {prefix: entries for prefix, entries in by_part.items() if prefix not in known}  # parts not registered
    for prefix, cls in known.items():
        if cls.key in saved or prefix in by_part:  # a part saved with no state at all has no entries
            out[cls.key] = cls.from_entries(by_part.get(prefix, {}))
    return {**meta, **out}

