"""Trainer checkpoints through torch.distributed.checkpoint (DCP): every rank writes its own block of the sharded
proxies, replicated state is written once, and a load re-shards to the world size at hand.

    saver = DCPSaver(checkpointer)                      # one per trainer (trainer/dcp_save.py)
    saver.save(parts, step, async_save=False)           # collective; CheckpointWriteError when the disk refuses
    saver.wait()                                        # collective: finish a pending async save (publish it)
    meta = read_meta(path)                              # config, position, rng, ... (small; any process)
    tensors = load_train_state(path, module, optimizer, criterion)   # collective: this rank's share
    state = load_consolidated(path)                     # one process: the .pt layout (tools, tests, evaluate)

On disk (checkpoint.format=dcp; names in trainer/checkpoint.py):

    step-000000042/            .metadata + __<rank>_0.distcp per rank (DCP's FileSystemWriter, fsynced)
    step-000000042.json        sidecar: size and sha256 of every file in the folder, step, epoch, run_uid

Every rank writes into `.tmp-step-000000042/`; once DCP has returned on every rank (its .metadata is written by
rank 0 after all ranks' data), each rank hashes its own files, rank 0 writes the sidecar and renames the folder
to `step-000000042/`: a checkpoint counts only once complete. With `async_save` the write runs in a background
thread (DCP's async_save on a gloo group of its own, a clone of this rank's tensors staged first) and is
published at the next save or `wait()`.

Keys of the flat DCP state dict (flatten off): `model/<k>` (embedder), `criterion/<k>`, `optim/<param fqn>/<k>`
(tensors of the optimizer state), `optim/param_groups`, `optim/other`, `optim/engine` (DeepSpeed's reference),
`scheduler`, `trainer` (config, position, every rank's RNG state, ids). Rows of the sharded proxies (and of the
optimizer state shaped like them) are this rank's block [proxy_start, proxy_stop) of the (C*N, ...) table,
described to DCP by the `CheckpointableTensor` fields (global_shape, global_offsets, local_offsets,
local_sizes), so that blocks of any size and offset are stored as chunks of one global tensor; everything
else is contributed by rank 0 only (rank 0's values, like the .pt checkpoint).
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
from trainer.checkpoint import (
    CheckpointError,
    sidecar,
    upgrade,
)
from trainer.safe_load import SafeFileSystemReader, SafeLoadPlanner, UnsafeFileError, read_dcp_metadata, torch_load

PROXY_PARAM = "criterion.proxies"  # TrainModule's name of the sharded proxy table
METADATA = ".metadata"


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


def annotate_rows(t: torch.Tensor, start: int, total: int) -> torch.Tensor:
    """Mark `t` (rows, ...) as rows [start, start + rows) of a (total, ...) tensor for DCP (any offsets)."""
    t.global_shape = (total, *t.shape[1:])
    t.global_offsets = ((start,) + (0,) * (t.dim() - 1),)
    t.local_offsets = ((0,) * t.dim(),)
    t.local_sizes = (tuple(t.shape),)
    return t


def _is_rows(t) -> bool:
    return torch.is_tensor(t) and hasattr(t, "global_shape")


# ----------------------------------------------------------------------------------------------- building

def param_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names of `module` in the order of the optimizer's state dict ids."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def build_state(meta: dict, embedder, criterion, optimizer_sd: dict, fqns, scheduler_sd: dict,
                rank: int) -> dict:
    """This rank's flat DCP state dict (see the module docstring). `optimizer_sd`: the engine's optimizer state
    dict, whose ids are the positions in `fqns` (parameter names, or a callable giving them), or DeepSpeed's
    reference {"deepspeed": {...}} (its own checkpoint holds the optimizer)."""
    rows = criterion.local_rows()
    sd: dict = {}
    if rows is not None:
        start, stop, total = rows
        sd["criterion/proxies"] = annotate_rows(criterion.proxies.detach(), start, total)
    if rank == 0:
        sd["trainer"] = Blob(meta)
        sd["scheduler"] = Blob(scheduler_sd)
        model = embedder.state_dict()
        sd.update({f"model/{k}": v for k, v in model.items() if torch.is_tensor(v)})
        sd["model/other"] = Blob({k: v for k, v in model.items() if not torch.is_tensor(v)})
        if rows is None:
            sd.update({f"criterion/{k}": v for k, v in criterion.state_dict().items()})
    if "deepspeed" in optimizer_sd:
        if rank == 0:
            sd["optim/engine"] = Blob(optimizer_sd)
        return sd
    fqns = fqns() if callable(fqns) else fqns
    other = {}
    for i, st in optimizer_sd["state"].items():
        name = fqns[i]
        for k, v in st.items():
            if rows is not None and name == PROXY_PARAM and torch.is_tensor(v) and v.dim() > 0:
                sd[f"optim/{name}/{k}"] = annotate_rows(v.detach(), rows[0], rows[2])
            elif rank == 0 and torch.is_tensor(v):
                sd[f"optim/{name}/{k}"] = v
            elif rank == 0:
                other.setdefault(name, {})[k] = v
    if rank == 0:
        sd["optim/other"] = Blob(other)
        sd["optim/param_groups"] = Blob([{**g, "params": [fqns[i] for i in g["params"]]}
                                         for g in optimizer_sd["param_groups"]])
    return sd


# ------------------------------------------------------------------------------------------------ checking

def _digest(path: str) -> dict:
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
            if _digest(file)["sha256"] != want["sha256"]:
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


def load_train_state(path: str, module, optimizer, criterion, device=None) -> dict:
    """Collective: model, criterion, optimizer and scheduler state dicts for this rank from folder `path`, on any
    world size. Sharded proxies and their optimizer rows come as this rank's block (never the full table);
    the optimizer state dict has the ids of `optimizer`'s current parameter order. Raises CheckpointError."""
    md = metadata(path)
    rows = criterion.local_rows()
    target = {}
    for k, m in md.state_dict_metadata.items():
        if k == "trainer":
            continue
        if isinstance(m, BytesStorageMetadata):
            target[k] = Blob()
        elif rows is not None and (k == "criterion/proxies" or k.startswith(f"optim/{PROXY_PARAM}/")) \
                and len(m.size) > 0 and m.size[0] == rows[2]:
            start, stop, total = rows
            target[k] = annotate_rows(torch.empty((stop - start, *m.size[1:]), dtype=m.properties.dtype), start,
                                      total)
        else:
            target[k] = torch.empty(m.size, dtype=m.properties.dtype)
    _load(path, target, no_dist=False)
    out = _assemble(target, lambda: param_names(module, optimizer))
    if device is not None:
        out["criterion"] = {k: v.to(device) for k, v in out["criterion"].items()}
    return out


def _assemble(loaded: dict, fqns) -> dict:
    """The .pt layout from a loaded flat dict: model, criterion, optimizer (ids as in `fqns`, a callable giving
    the current parameter names, or in the saved order when None), scheduler."""
    def plain(v):
        if _is_rows(v):
            for a in ("global_shape", "global_offsets", "local_offsets", "local_sizes"):
                delattr(v, a)
        return v

    model = {k[len("model/"):]: plain(v) for k, v in loaded.items() if k.startswith("model/") and k != "model/other"}
    model.update(loaded["model/other"].value if "model/other" in loaded else {})
    criterion = {k[len("criterion/"):]: plain(v) for k, v in loaded.items() if k.startswith("criterion/")}
    if "optim/engine" in loaded:
        optimizer = loaded["optim/engine"].value
    else:
        groups = loaded["optim/param_groups"].value
        saved_order = [n for g in groups for n in g["params"]]
        order = fqns() if fqns is not None else saved_order
        ids = {n: i for i, n in enumerate(order)}
        missing = [n for n in saved_order if n not in ids]
        if missing:
            raise CheckpointError(f"the checkpoint's optimizer has parameters this model lacks: {missing[:3]}")
        state: dict = {}
        for k, v in loaded.items():
            if k.startswith("optim/") and torch.is_tensor(v):
                name, key = k[len("optim/"):].rsplit("/", 1)
                state.setdefault(ids[name], {})[key] = plain(v)
        for name, st in loaded["optim/other"].value.items():
            state.setdefault(ids[name], {}).update(st)
        optimizer = {"state": dict(sorted(state.items())),
                     "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in groups]}
    return dict(model=model, criterion=criterion, optimizer=optimizer,
                scheduler=loaded["scheduler"].value if "scheduler" in loaded else None)


def load_consolidated(path: str, model_only: bool = False) -> dict:
    """The checkpoint in folder `path` as one dict of the .pt layout (full tensors, on the CPU), read by this
    process alone. `model_only`: config, position and model, without proxies and optimizer (evaluation)."""
    md = metadata(path)
    keys = [k for k in md.state_dict_metadata
            if not model_only or k in ("trainer", "model/other") or k.startswith("model/")]
    target = _full_targets(md, keys)
    _load(path, target, no_dist=True)
    meta = target.pop("trainer").value if "trainer" in target else {}
    if model_only:
        model = {k[len("model/"):]: v for k, v in target.items() if k.startswith("model/") and k != "model/other"}
        model.update(target["model/other"].value if "model/other" in target else {})
        return {**meta, "model": model}
    return {**meta, **_assemble(target, None)}

