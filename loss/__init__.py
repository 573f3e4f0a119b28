"""The ProxyGML loss (`from loss import ProxyGML`) and its distributed forms (`loss.build_criterion`)."""

from loss.distributed import build_criterion, ddp_ignore
from loss.proxygml import ProxyGML

__all__ = ["ProxyGML", "build_criterion", "ddp_ignore"]
