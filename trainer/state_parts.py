"""The pieces of training state a checkpoint holds, each a `StatePart`; the checkpoint formats save, verify and
load the dict of them without knowing what is inside (trainer/train_state.py, trainer/dcp_checkpoint.py).

    parts = build_parts(trained)            # {key: StatePart}, in registration order; built once per run
    full = parts["model"].full_state()      # collective: the whole state (a .pt checkpoint's entry `key`)
    local = parts["criterion"].local_state()  # this rank's share (a DCP folder's entries `<dcp_prefix>/<name>`)

A part gives and takes its state in two shapes: whole (`full_state` / `load_full_state`: what one process
would hold; checkpoint.format=torch) and this rank's (`local_state` / `load_local_state`; checkpoint.format=dcp).
For DCP it turns its local state into flat entries (`entries`, back with `from_entries`): tensors, values of
any other kind (saved as one object each) and row blocks, tensors annotated with `annotate_rows` as rows
[start, stop) of a (total, ...) table, written by every rank and cut again on load (`block_of`) for the world
size at hand. Everything that is not a row block is written by rank 0 alone.

A new piece of state (say EMA weights) is one StatePart subclass and one line, `register_state_part(EMAPart)`;
its `build(trained)` may return None when the run has no such state.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from registry import Registry

Rows = tuple[int, int, int]  # (start, stop, total): rows [start, stop) of a table of `total` rows


def annotate_rows(t: torch.Tensor, start: int, total: int) -> torch.Tensor:
    """Mark `t` (rows, ...) as rows [start, start + rows) of a (total, ...) tensor, in the fields DCP reads from a
    CheckpointableTensor (global_shape, global_offsets, local_offsets, local_sizes). Returns `t`."""
    marked: Any = t  # the fields are DCP's protocol, not Tensor attributes
    marked.global_shape = (total, *t.shape[1:])
    marked.global_offsets = ((start,) + (0,) * (t.dim() - 1),)
    marked.local_offsets = ((0,) * t.dim(),)
    marked.local_sizes = (tuple(t.shape),)
    return t


def is_row_block(t) -> bool:
    """True for a tensor marked by `annotate_rows`."""
    return torch.is_tensor(t) and hasattr(t, "global_shape")


def plain(t):
    """`t` without the marks of `annotate_rows` (anything else unchanged)."""
    if is_row_block(t):
        for a in ("global_shape", "global_offsets", "local_offsets", "local_sizes"):
            delattr(t, a)
    return t


class StatePart(ABC):
    """One piece of training state. `key`: its entry in a .pt checkpoint; `dcp_prefix`: the prefix of its entries
    in a DCP folder (`<dcp_prefix>/<name>`, or `<dcp_prefix>` alone for the name ""); default `key`."""

    key: ClassVar[str]
    dcp_prefix: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("dcp_prefix") and "key" in cls.__dict__:
            cls.dcp_prefix = cls.key

    @classmethod
    @abstractmethod
    def build(cls, trained) -> StatePart | None:
        """This part over `trained` (a trainer.train_state.Trained), or None when the run has no such state."""

    @abstractmethod
    def local_state(self) -> Any:
        """This rank's state (row blocks marked with `annotate_rows`); the whole state when nothing is cut."""

    @abstractmethod
    def load_local_state(self, value: Any) -> None:
        """Load what `from_entries` made of this rank's share of a DCP folder."""

    def full_state(self) -> Any:
        """Collective: the whole state, as one process would hold it (cut rows gathered)."""
        return self.local_state()

    def load_full_state(self, value: Any) -> None:
        """Load a `full_state()` written on any world size."""
        self.load_local_state(value)

    def entries(self, value: Any) -> dict[str, Any]:
        """`value` (a `local_state()`) as flat DCP entries {name: tensor | row block | other value}."""
        return dict(value)

    @classmethod
    def from_entries(cls, entries: dict[str, Any], live: StatePart | None = None) -> Any:
        """The inverse of `entries`, from what DCP loaded (row blocks already plain). `live`: this run's part
        (a load to resume), or None (one process reading a checkpoint whole: the layout it was saved in)."""
        return dict(entries)

    def block_of(self, name: str, shape: tuple[int, ...]) -> Rows | None:
        """For a saved entry `name` of global `shape`: the rows this rank loads, or None for the whole entry."""
        return None

    def missing(self) -> str:
        """Said when a checkpoint has no entry for this part (written before it existed); the part starts fresh."""
        return f"the checkpoint has no '{self.key}' state (written before it was kept): '{self.key}' starts fresh"


_PARTS: Registry[type[StatePart]] = Registry("state part")


def register_state_part(cls: type[StatePart]) -> type[StatePart]:
    """Keep `cls` in every checkpoint from now on (after the parts registered before it). Raises ValueError when
    its key or DCP prefix is taken."""
    for other in _PARTS.as_dict().values():
        if other is not cls and (other.key == cls.key or other.dcp_prefix == cls.dcp_prefix):
            raise ValueError(f"state part {cls.__name__}: key '{cls.key}' / prefix '{cls.dcp_prefix}' is taken by "
                             f"{other.__name__}")
    return _PARTS.add(cls.key, cls)


def unregister_state_part(key: str) -> None:
    _PARTS.remove(key)


def state_parts() -> dict[str, type[StatePart]]:
    """The registered part classes, {key: class}, in registration order."""
    return _PARTS.as_dict()


def build_parts(trained) -> dict[str, StatePart]:
    """{key: part} of every registered part that `trained` has (collective only where a part's build is)."""
    built = {key: cls.build(trained) for key, cls in _PARTS.as_dict().items()}
    return {key: part for key, part in built.items() if part is not None}


# --------------------------------------------------------------------------------------------- the built-ins

class StateDictPart(StatePart):
    """A part over one object of `Trained` (its field `field`) with state_dict() / load_state_dict(), whole on
    every rank."""
    field: ClassVar[str]

    def __init__(self, obj):
        self.obj = obj

    @classmethod
    def build(cls, trained):
        return cls(getattr(trained, cls.field))

    def local_state(self) -> dict:
        return self.obj.state_dict()

    def load_local_state(self, value: dict) -> None:
        self.obj.load_state_dict(value)


class ModelPart(StateDictPart):
    """The embedder's state dict; in DCP its tensors one entry each, its other values in one entry `other`."""
    key = "model"
    field = "embedder"

    def entries(self, value: dict) -> dict:
        out: dict[str, Any] = {k: v for k, v in value.items() if torch.is_tensor(v)}
        out["other"] = {k: v for k, v in value.items() if not torch.is_tensor(v)}
        return out

    @classmethod
    def from_entries(cls, entries, live=None) -> dict:
        model = {k: v for k, v in entries.items() if k != "other"}
        model.update(entries.get("other") or {})
        return model


class CriterionPart(StatePart):
    """The criterion's state through its contract (loss/criterion.py): the tables it declares cut by rows
    (`sharded_rows()`) are saved as every rank's block and gathered whole only for a .pt checkpoint."""
    key = "criterion"

    def __init__(self, criterion):
        self.criterion = criterion

    @classmethod
    def build(cls, trained):
        return cls(trained.criterion)

    def local_state(self) -> dict:
        cut = self.criterion.sharded_rows()
        state = {k: v.detach() if torch.is_tensor(v) else v for k, v in self.criterion.state_dict().items()}
        for name, (start, _, total) in cut.items():
            state[name] = annotate_rows(state[name], start, total)
        return state

    def load_local_state(self, value: dict) -> None:
        self.criterion.load_local_state_dict(value)

    def full_state(self) -> dict:
        return self.criterion.full_state_dict()

    def load_full_state(self, value: dict) -> None:
        self.criterion.load_full_state_dict(value)

    def block_of(self, name, shape):
        rows = self.criterion.sharded_rows().get(name)
        return rows if rows is not None and len(shape) > 0 and shape[0] == rows[2] else None


def param_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names of `module` in the order of the optimizer's state dict ids."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


class OptimizerPart(StatePart):
    """The optimizer's state dict, through the engine when it has one (DeepSpeed keeps its own files: the state
    dict is then only its reference {"deepspeed": ...}). In DCP each state tensor is the entry
    `<parameter name>/<state key>` (rows cut like the criterion's table they belong to), with `param_groups` (ids
    as names), `other` (values that are not tensors) and `engine` (DeepSpeed's reference)."""
    key = "optimizer"
    dcp_prefix = "optim"

    def __init__(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module, criterion, engine=None):
        self.optimizer, self.module, self.criterion, self.engine = optimizer, module, criterion, engine

    @classmethod
    def build(cls, trained):
        return cls(trained.optimizer, trained.module, trained.criterion, trained.engine)

    def names(self) -> list[str]:
        return param_names(self.module, self.optimizer)

    @functools.cached_property
    def cut_params(self) -> dict[str, Rows]:
        """{parameter name in `module`: rows} of the criterion's parameters that are cut by rows (found once: the
        parameters and their blocks stay those of the run)."""
        cut = self.criterion.sharded_rows()
        params = dict(self.criterion.named_parameters())
        ids = {id(params[name]): rows for name, rows in cut.items() if name in params}
        return {n: ids[id(p)] for n, p in self.module.named_parameters() if id(p) in ids}

    def local_state(self) -> dict:
        return self.engine.optimizer_state_dict() if self.engine is not None else self.optimizer.state_dict()

    def load_local_state(self, value: dict) -> None:
        if self.engine is not None:
            self.engine.load_optimizer_state_dict(value)
        else:
            self.optimizer.load_state_dict(value)

    def full_state(self) -> dict:
        return self.criterion.optimizer_state_to_full(self.local_state())  # sharded: the full table (collective)

    def load_full_state(self, value: dict) -> None:
        self.load_local_state(self.criterion.optimizer_state_from_full(value))

    def entries(self, value: dict) -> dict:
        if "deepspeed" in value:
            return {"engine": value}
        names, cut = self.names(), self.cut_params
        out: dict = {}
        other: dict = {}
        for i, st in value["state"].items():
            name = names[i]
            for k, v in st.items():
                if name in cut and torch.is_tensor(v) and v.dim() > 0:
                    out[f"{name}/{k}"] = annotate_rows(v.detach(), cut[name][0], cut[name][2])
                elif torch.is_tensor(v):
                    out[f"{name}/{k}"] = v
                else:
                    other.setdefault(name, {})[k] = v
        out["other"] = other
        out["param_groups"] = [{**g, "params": [names[i] for i in g["params"]]} for g in value["param_groups"]]
        return out

    @classmethod
    def from_entries(cls, entries, live=None) -> dict:
        """The optimizer state dict with the ids of `live`'s current parameter order (saved order when None).
        Raises CheckpointError when the checkpoint has parameters the model lacks."""
        if "engine" in entries:
            return entries["engine"]
        groups = entries["param_groups"]
        saved_order = [n for g in groups for n in g["params"]]
        ids = {n: i for i, n in enumerate(live.names() if live is not None else saved_order)}
        missing = [n for n in saved_order if n not in ids]
        if missing:
            from trainer.checkpoint_disk import CheckpointError
            raise CheckpointError(f"the checkpoint's optimizer has parameters this model lacks: {missing[:3]}")
        state: dict = {}
        for k, v in entries.items():
            if torch.is_tensor(v):
                name, key = k.rsplit("/", 1)
                state.setdefault(ids[name], {})[key] = v
        for name, st in entries["other"].items():
            state.setdefault(ids[name], {}).update(st)
        return {"state": dict(sorted(state.items())),
                "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in groups]}

    def block_of(self, name, shape):
        param = name.rsplit("/", 1)[0]
        rows = self.cut_params.get(param)
        return rows if rows is not None and len(shape) > 0 and shape[0] == rows[2] else None


class SchedulerPart(StateDictPart):
    """The learning-rate schedule's state dict (one DCP entry `scheduler`)."""
    key = "scheduler"
    field = "scheduler"

    def entries(self, value: dict) -> dict:
        return {"": value}

    @classmethod
    def from_entries(cls, entries, live=None) -> dict:
        return entries[""]


register_state_part(ModelPart)
register_state_part(CriterionPart)
register_state_part(OptimizerPart)
register_state_part(SchedulerPart)
