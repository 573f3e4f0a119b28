"""The pytorch-metric-learning family: config section `loss.pml`, any loss of `pytorch_metric_learning.losses`
with an optional miner (loss/baselines.py), in modes gather (the loss sees the global batch) and local."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from loss.family import LossContext, LossFamily

_KEYS = ("loss.name", "loss.kwargs", "loss.miner_kwargs", "loss.miner")  # loss/baselines.py's message prefixes


@dataclass
class MetricLossConfig:
    name: str = ""  # a pytorch-metric-learning loss class, e.g. ProxyAnchorLoss (loss/baselines.py)
    kwargs: dict[str, Any] = field(default_factory=dict)  # arguments of that loss (e.g. {margin: 0.1})
    miner: str = ""  # pytorch-metric-learning miner class for it, e.g. MultiSimilarityMiner; "" = none
    miner_kwargs: dict[str, Any] = field(default_factory=dict)


class MetricLossFamily(LossFamily):
    """A pytorch-metric-learning loss (loss/baselines.py's MetricLoss); its state is whole on every rank."""

    name = "pml"
    section = MetricLossConfig
    modes = ("gather", "local")
    fixed_keys = {"name": "the saved criterion is another loss"}

    def build(self, section: Any, mode: str, num_classes: int, dim: int, *, seed: int = 0) -> Any:
        from loss.baselines import MetricLoss
        return MetricLoss(section.name, num_classes, dim, _plain(section.kwargs), section.miner or None,
                          _plain(section.miner_kwargs), gather=mode == "gather")

    def describe(self, section: Any, mode: str) -> str:
        miner = f", miner {section.miner}" if section.miner else ""
        return f"{section.name} ({mode}{miner})"

    def validate(self, section: Any, mode: str, context: LossContext) -> None:
        """The loss, its arguments and miner, tried with two training steps on a toy batch labelled as
        data.sampler makes batches (4 classes: milliseconds; loss/baselines.py's check). Raises ValueError naming
        the key (`loss.pml.name: ...`, `loss.pml.kwargs: ...`, `data.sampler: ...`)."""
        if not section.name:
            raise ValueError("loss.pml.name: required with loss.family=pml, e.g. loss.pml.name=ProxyAnchorLoss")
        from loss.baselines import check
        kwargs = _plain(section.kwargs)
        try:
            check(section.name, context.dim, kwargs, section.miner or None, _plain(section.miner_kwargs),
                  sampler=context.sampler, m_per_class=context.m_per_class)
        except Exception as e:  # every failure names the key (check() names it when it can)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            msg = msg.replace("choose 'proxygml' or one of", "choose one of").replace("(with loss.kwargs ",
                                                                                      "(with loss.pml.kwargs ")
            for key in _KEYS:
                if msg.startswith(key + ":"):
                    raise ValueError("loss.pml." + msg[len("loss."):]) from None
            if msg.startswith("data."):
                raise ValueError(msg) from None
            raise ValueError(f"loss.pml.name: {section.name} with {kwargs} fails: {type(e).__name__}: {msg}") from None


def _plain(node: Any) -> dict:
    """A dict from an omegaconf node or a dict."""
    if hasattr(node, "_metadata"):
        from omegaconf import OmegaConf
        return cast(dict, OmegaConf.to_container(node))
    return dict(node or {})
