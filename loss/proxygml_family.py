"""The ProxyGML family: config section `loss.proxygml`, the criterion in every mode (loss/distributed.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loss.family import LossFamily, in_range, non_negative, positive


@dataclass
class ProxyGMLConfig:
    proxies_per_class: int = positive(1)  # N
    r: float = in_range(0.05, 0, 1)  # share of proxies kept per sample (top-k subgraph)
    lam: float = non_negative(0.3)  # weight of the proxy loss L_P
    pos_mask: bool = True  # S^pos: a sample's own-class proxies always enter its subgraph
    class_mask: bool = True  # M: the softmax runs over the classes that got an edge only
    proxy_reg: bool = True  # L_P on (false: L = L_S alone)
    scale: float = positive(1.0)  # Z (per-class sums of cosines) times this before the softmax; 1 = the paper


class ProxyGMLFamily(LossFamily):
    """ProxyGML (Zhu et al., NeurIPS 2020) in modes gather (all ranks' embeddings meet all proxies), local (each
    rank's own) and sharded (proxies split by class over the ranks)."""

    name = "proxygml"
    section = ProxyGMLConfig
    modes = ("gather", "local", "sharded")
    fixed_keys = {"proxies_per_class": "the saved proxy table has another number of rows"}

    def build(self, section: Any, mode: str, num_classes: int, dim: int, *, seed: int = 0) -> Any:
        from loss.distributed import build_criterion
        return build_criterion(mode, num_classes, dim, seed=seed, **{k: getattr(section, k) for k in self.defaults()})

    def describe(self, section: Any, mode: str) -> str:
        return (f"ProxyGML ({mode}, {section.proxies_per_class} proxies/class, r {section.r:g}, "
                f"lam {section.lam:g})")

    def layout(self, mode: str) -> str:
        return "sharded" if mode == "sharded" else "replicated"
