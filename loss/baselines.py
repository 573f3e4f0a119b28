"""Well-known metric-learning losses of pytorch-metric-learning behind ProxyGML's call.

`MetricLoss(name, num_classes, dim, kwargs, miner, miner_kwargs)` builds any loss of
`pytorch_metric_learning.losses` by class name (with an optional miner of
`pytorch_metric_learning.miners`) and exposes the same interface as `loss.ProxyGML`:
`forward(embeddings, labels) -> scalar`, `last_parts`, and `proxy_parameters()` (the loss's own
weights: proxies, class centres, softmax weights) so the trainer can give them the proxy learning rate.

Pair-based losses (MultiSimilarity, Triplet, Contrastive, ...) should see the global batch: with
`gather=True` the embeddings and labels of every rank are all-gathered with gradients first. Every rank
then computes the same global loss; the all-gather's backward sums the identical per-rank gradients
into each rank's share (x world size) and DDP's averaging divides it again, so the update equals the one
of a single process on the concatenated batch.
"""

from __future__ import annotations

import inspect
from typing import Any, cast

import torch
from pytorch_metric_learning import losses, miners
from torch import nn

from collectives import all_gather_rows
from loss.criterion import CriterionBase

# Constructor arguments under which pytorch-metric-learning's classifier-style losses take the class count
# and the embedding size (P2SGradLoss calls the latter descriptors_dim).
_CLASS_ARGS = {"num_classes": "classes", "embedding_size": "dim", "descriptors_dim": "dim"}


# Classes of pytorch_metric_learning.losses that cannot be a `loss.name` here, and why (the check below refuses
# them; tests/loss/test_baselines.py checks that every other one passes it).
UNSUITABLE = {
    "GenericPairLoss": "an abstract base class",
    "SelfSupervisedLoss": "it wraps another loss object, which a config cannot give",
    "ManifoldLoss": "it takes no class labels",
    "VICRegLoss": "it takes no class labels",
}


def available_losses() -> list[str]:
    """The pytorch-metric-learning losses a config can name: every class ending in Loss but UNSUITABLE."""
    return sorted(n for n, obj in vars(losses).items()
                  if n.endswith("Loss") and inspect.isclass(obj) and n not in UNSUITABLE)


def required_kwargs(name: str) -> list[str]:
    """Constructor arguments of loss `name` without a default that the trainer does not fill (loss.kwargs)."""
    params = inspect.signature(getattr(losses, name).__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _CLASS_ARGS]


def loss_choices() -> str:
    """The choices of loss.name in words, with the loss.kwargs each one needs."""
    named = [f"{n} (with loss.kwargs {', '.join(r)})" if (r := required_kwargs(n)) else n for n in available_losses()]
    return "'proxygml' or one of " + ", ".join(named)


def init_parameters(cls: type) -> set[str]:
    """Names a class's constructor accepts, following `*args, **kwargs` to the parent classes' constructors
    (CosFaceLoss(*args, margin, scale, **kwargs) passes num_classes and embedding_size on to its parent)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names - {"self"}


def check(name: str, dim: int, kwargs: dict | None = None, miner: str | None = None,
          miner_kwargs: dict | None = None, sampler: str = "shuffle", m_per_class: int = 4) -> None:
    """Build the loss (and miner) on a 4-class toy and train two steps as training does (forward, backward, an
    optimizer step on the embeddings and the loss's own weights), on batches whose labels come as `sampler` makes
    them (toy_labels).

    Raises ValueError whose message starts with the key at fault (`loss.name: ...`, `loss.kwargs: ...`,
    `loss.miner: ...`, `loss.miner_kwargs: ...`, `data.sampler: ...`) for anything that goes wrong, whatever the
    exception."""
    try:
        crit = MetricLoss(name, 4, dim, kwargs, miner, miner_kwargs, gather=False)
    except ValueError:
        raise
    except Exception as e:  # a constructor failing in its own way (KeyError, AssertionError, ...)
        key = "loss.kwargs" if kwargs else "loss.name"
        raise ValueError(f"{key}: {name}({kwargs or ''}) fails: {type(e).__name__}: {_first_line(e)}") from e
    try:
        _two_steps(crit, dim, toy_labels(sampler, m_per_class))
    except Exception as e:
        if sampler != "m_per_class":
            try:  # does the loss want batches of m samples per class?
                _two_steps(MetricLoss(name, 4, dim, kwargs, miner, miner_kwargs, gather=False), dim,
                           toy_labels("m_per_class", m_per_class))
            except Exception:  # noqa: BLE001 - it does not train either way: the loss is at fault
                pass
            else:
                raise ValueError(f"data.sampler: {name} trains only on batches of equal samples per class "
                                 f"({type(e).__name__}: {_first_line(e)}); set data.sampler=m_per_class") from e
        raise ValueError(f"loss.name: {name} cannot train on batches of (embeddings, class labels) of "
                         f"data.sampler={sampler}: {type(e).__name__}: {_first_line(e)}") from e


def _two_steps(crit: MetricLoss, dim: int, labels: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(len(labels), dim, generator=gen).requires_grad_()
    optimizer = torch.optim.SGD([emb, *crit.proxy_parameters()], lr=0.01)
    for _ in range(2):
        loss = crit(emb, labels)
        if loss.dim() != 0 or not torch.isfinite(loss):
            raise ValueError(f"it gives {tuple(loss.shape)} / {loss.detach()} on a toy batch, not a finite scalar")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _detach_running_state(module: nn.Module) -> None:
    """Running statistics a loss keeps across calls (DynamicSoftMarginLoss's histogram) cut from this step's
    graph: kept attached, the next step's backward runs through the freed graph of this one and fails."""
    for name, value in list(vars(module).items()):
        if torch.is_tensor(value) and value.grad_fn is not None:
            setattr(module, name, value.detach())


def toy_labels(sampler: str, m_per_class: int) -> torch.Tensor:
    """Labels of a toy batch as `data.sampler` makes them: `shuffle`, classes in unequal numbers (as a random
    draw gives); `m_per_class`, 4 classes of m each."""
    if sampler == "m_per_class":
        return torch.arange(4).repeat_interleave(max(2, int(m_per_class)))
    return torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


class MetricLoss(CriterionBase):
    """A pytorch-metric-learning loss (and miner) behind the `Criterion` contract: its state is whole on every
    rank, it has no selection counts (no proxy statistics)."""

    def __init__(
        self,
        name: str,
        num_classes: int,
        dim: int,
        kwargs: dict | None = None,
        miner: str | None = None,
        miner_kwargs: dict | None = None,
        gather: bool = True,
    ):
        super().__init__()
        cls: Any = getattr(losses, name, None)
        if name in UNSUITABLE:
            raise ValueError(f"loss.name: {name} cannot be trained here ({UNSUITABLE[name]}); choose {loss_choices()}")
        if not (inspect.isclass(cls) and name.endswith("Loss")):
            raise ValueError(f"loss.name: unknown loss {name!r}; choose {loss_choices()}")
        kwargs = dict(kwargs or {})
        sizes = {"classes": int(num_classes), "dim": int(dim)}
        for arg in init_parameters(cls) & _CLASS_ARGS.keys():
            kwargs.setdefault(arg, sizes[_CLASS_ARGS[arg]])
        try:
            self.loss_fn = cast(nn.Module, cls(**kwargs))
        except TypeError as e:
            raise ValueError(f"loss.kwargs: {name} rejects {kwargs}: {e}") from e
        self.miner: nn.Module | None = None
        if miner:
            mcls: Any = getattr(miners, miner, None)
            if not inspect.isclass(mcls):
                names = sorted(n for n in vars(miners) if n.endswith("Miner"))
                raise ValueError(f"loss.miner: unknown miner {miner!r}; choose one of {names}")
            try:
                self.miner = cast(nn.Module, mcls(**(miner_kwargs or {})))
            except TypeError as e:
                raise ValueError(f"loss.miner_kwargs: {miner} rejects {miner_kwargs}: {e}") from e
        self.name = name
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.gather = gather
        self.last_parts: dict[str, torch.Tensor] = {}

    def proxy_parameters(self) -> list[nn.Parameter]:
        """The loss's own trainable weights (proxies, centres); they take the proxy learning rate."""
        return list(self.loss_fn.parameters())

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings: expected shape (M, {self.dim}), got {tuple(embeddings.shape)}")
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"labels: expected shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError("labels: must be integers")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels: must lie in [0, {self.num_classes})")
        emb = embeddings.float()
        if self.gather:
            emb, labels = all_gather_rows(emb, with_grad=True)[0], all_gather_rows(labels)[0]
        indices = self.miner(emb, labels) if self.miner is not None else None
        loss = self.loss_fn(emb, labels, indices)
        self.last_parts = {"loss": loss.detach()}
        _detach_running_state(self.loss_fn)
        return loss
