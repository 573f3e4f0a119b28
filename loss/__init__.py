"""The ProxyGML loss (`from loss import ProxyGML`), its distributed forms (`loss.build_criterion`) and the contract
every loss form implements (`loss.Criterion`, loss/criterion.py)."""

from loss.criterion import Criterion
from loss.distributed import build_criterion, ddp_ignore
from loss.proxygml import ProxyGML

__all__ = ["Criterion", "ProxyGML", "build_criterion", "ddp_ignore"]
