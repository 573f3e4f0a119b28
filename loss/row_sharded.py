"""A criterion whose tables are cut by classes across ranks (`RowSharded`): rank r holds the contiguous block of
classes `collectives.block(num_classes, world, r)`, i.e. rows [start, stop) of each (num_classes * rows_per_class,
...) table it names in `sharded_tables`. What the checkpoints and statistics need of such a criterion lives here
once (gather the full table, cut it back, the optimizer's per-row state likewise, the rows it declares through
`sharded_rows()`); loss/sharded.py (ProxyGML's proxies) builds on it.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from collectives import block, broadcast_, world
from loss.criterion import CriterionBase


def map_group_rows(optimizer_sd: dict, name: str, rows: int, fn) -> dict:
    """A copy of an optimizer state dict whose per-row state tensors (first dim `rows`) of param group
    `name` went through `fn`. Sharded tables: gather a rank's rows to the full table or cut them back."""
    ids = [i for g in optimizer_sd["param_groups"] if g.get("name") == name for i in g["params"]]
    state = dict(optimizer_sd["state"])
    for i in ids:  # the same ids and keys, in the same order, on every rank: fn may be collective
        if i in state:
            state[i] = {k: fn(v) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v
                        for k, v in state[i].items()}
    return {**optimizer_sd, "state": state}


class RowSharded(CriterionBase):
    """The tables named in `sharded_tables` (entries of ``state_dict()``, parameters or buffers, each of shape
    (rows_per_class * (stop_class - start_class), ...)) hold this rank's classes; the rest of the state is whole
    on every rank. Subclasses set `num_classes`, `rows_per_class`, `group` and call `hold_rows(start, stop)`
    with their class block before use. Their parameters belong to the optimizer's group "proxies"."""

    sharded_tables: ClassVar[tuple[str, ...]] = ()
    num_classes: int
    rows_per_class: int
    group: object

    def hold_rows(self, class_start: int, class_stop: int) -> None:
        """Record this rank's block of classes [class_start, class_stop)."""
        n = self.rows_per_class
        self.row_start, self.row_stop = class_start * n, class_stop * n

    @property
    def total_rows(self) -> int:
        return self.num_classes * self.rows_per_class

    def sharded_rows(self) -> dict[str, tuple[int, int, int]]:
        return {name: (self.row_start, self.row_stop, self.total_rows) for name in self.sharded_tables}

    def gather_rows(self, rows: Tensor) -> Tensor:
        """The full (num_classes * rows_per_class, ...) tensor, on the CPU, from every rank's block of rows
        (collective). One rank's block at a time is broadcast, so the device holds one block more, not the table."""
        size, rank = world(self.group)
        rows = rows.detach()
        if size == 1:
            return rows.cpu().clone()
        parts = []
        for src in range(size):
            start, stop = block(self.num_classes, size, src)
            if src == rank:
                buf = rows.contiguous()
            else:
                buf = rows.new_empty((stop - start) * self.rows_per_class, *rows.shape[1:])
            broadcast_(buf, src, group=self.group)
            parts.append(buf.cpu())
        full = torch.cat(parts)
        assert full.shape[0] == self.total_rows
        return full

    def shard_rows(self, full: Tensor) -> Tensor:
        """This rank's block of a full (num_classes * rows_per_class, ...) tensor. Raises ValueError on another
        number of rows."""
        if full.shape[0] != self.total_rows:
            raise ValueError(f"expected {self.total_rows} rows, got {tuple(full.shape)}")
        return full[self.row_start:self.row_stop]

    def full_state_dict(self) -> dict:
        """``state_dict()`` with every sharded table whole (collective: call on every rank)."""
        return {k: self.gather_rows(v) if k in self.sharded_tables else
                (v.detach().clone() if torch.is_tensor(v) else v) for k, v in self.state_dict().items()}

    def load_full_state_dict(self, state: dict) -> None:
        """Load a ``full_state_dict()`` from any world size (or from the one-process form of the loss). Raises
        ValueError naming the entry that is missing or has another shape."""
        own = self.state_dict()
        for name in self.sharded_tables:
            if name not in state:
                raise ValueError(f"state has no '{name}' entry (keys: {sorted(state)})")
            want = (self.total_rows, *own[name].shape[1:])
            if tuple(state[name].shape) != want:
                raise ValueError(f"state['{name}'] must have shape {want}, got {tuple(state[name].shape)}")
        self.load_local_state_dict({k: self.shard_rows(v) if k in self.sharded_tables else v
                                    for k, v in state.items()})

    def load_local_state_dict(self, state: dict) -> None:
        """This rank's share, as a DCP load gives it: its block of each sharded table, the rest whole."""
        self.load_state_dict(state)

    def optimizer_state_to_full(self, optimizer_sd: dict, group: str = "proxies") -> dict:
        """Each rank holds its block's optimizer state: the full table's (collective)."""
        return map_group_rows(optimizer_sd, group, self.row_stop - self.row_start, self.gather_rows)

    def optimizer_state_from_full(self, optimizer_sd: dict, group: str = "proxies") -> dict:
        device = next(iter(self.parameters())).device
        return map_group_rows(optimizer_sd, group, self.total_rows, lambda t: self.shard_rows(t).to(device))
