"""The written contract of every loss form (`Criterion`), and the defaults of a criterion whose state is whole on
every rank (`CriterionBase`): the trainer, its checkpoints and its statistics use only these methods.

Implemented by ProxyGML (one process, loss/proxygml.py), ReplicatedProxyGML (local | gather, loss/replicated.py),
ShardedProxyGML (a block of classes per rank, loss/sharded.py on loss/row_sharded.py) and MetricLoss
(pytorch-metric-learning, loss/baselines.py). Methods marked collective must be called on every rank, in the same order.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


class NonFiniteEmbeddings(ValueError):
    """The embeddings a criterion was given hold nan or inf: the weights upstream are no longer finite."""


@runtime_checkable
class Criterion(Protocol):
    """``loss = crit(embeddings (M, dim) float, labels (M,) int64)``: a scalar, the global loss on every rank."""

    num_classes: int
    last_parts: dict[str, Tensor]  # detached scalars of the last forward (e.g. loss_s, loss_p)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor: ...

    def proxy_parameters(self) -> list[nn.Parameter]:
        """The optimizer's "proxies" group: ProxyGML's proxies, a baseline loss's own weights."""
        ...

    def ddp_ignored_parameters(self) -> list[str]:
        """Names (relative to the criterion) of parameters and buffers DDP must leave alone."""
        ...

    def full_state_dict(self) -> dict:
        """The whole state, as one process would hold it (collective)."""
        ...

    def load_full_state_dict(self, state: dict) -> None:
        """Load a ``full_state_dict()`` written on any world size."""
        ...

    def load_local_state_dict(self, state: dict) -> None:
        """Load what a DCP load gives this rank: its own block when sharded, else the full state."""
        ...

    def sharded_rows(self) -> dict[str, tuple[int, int, int]]:
        """{name in ``state_dict()``: (start, stop, total)} of the tables cut by rows across ranks: this rank holds
        rows [start, stop) of a (total, ...) table; checkpoints save and load them as every rank's block (and the
        optimizer state of those that are parameters likewise). {} when the whole state is on every rank."""
        ...

    def local_rows(self) -> tuple[int, int, int] | None:
        """(start, stop, total) rows this rank owns of its sharded tables; None when replicated."""
        ...

    def optimizer_state_to_full(self, optimizer_sd: dict, group: str = "proxies") -> dict:
        """The optimizer state dict with param group ``group``'s per-row state gathered to the full (C*N, ...)
        table (collective); the same dict when replicated."""
        ...

    def optimizer_state_from_full(self, optimizer_sd: dict, group: str = "proxies") -> dict:
        """The inverse: this rank's block of each full per-row state of ``group``; the same dict when replicated."""
        ...

    def reset_selection_counts(self) -> None:
        """Start counting proxy selections anew (nothing to do for a loss without subgraphs)."""
        ...

    def proxy_statistics(self):
        """(summary, per_proxy, per_class) of the proxy selections since the last reset (collective; see
        loss/proxy_stats.py), or None when none was selected or the loss has no subgraphs. Does not reset."""
        ...


class CriterionBase(nn.Module):
    """The shared defaults: state whole on every rank (replicated), no selection counts, all parameters are
    the optimizer's proxy group. Subclasses override what differs."""

    num_classes: int
    last_parts: dict[str, Tensor]

    def proxy_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def ddp_ignored_parameters(self) -> list[str]:
        return []

    def full_state_dict(self) -> dict:
        return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in self.state_dict().items()}

    def load_full_state_dict(self, state: dict) -> None:
        self.load_state_dict(state)

    def load_local_state_dict(self, state: dict) -> None:
        self.load_full_state_dict(state)

    def sharded_rows(self) -> dict[str, tuple[int, int, int]]:
        return {}

    def local_rows(self) -> tuple[int, int, int] | None:
        rows = set(self.sharded_rows().values())
        return rows.pop() if len(rows) == 1 else None

    def optimizer_state_to_full(self, optimizer_sd: dict, group: str = "proxies") -> dict:
        return optimizer_sd

    def optimizer_state_from_full(self, optimizer_sd: dict, group: str = "proxies") -> dict:
        return optimizer_sd

    def reset_selection_counts(self) -> None:
        pass

    def proxy_statistics(self):
        return None
