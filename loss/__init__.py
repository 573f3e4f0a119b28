"""The ProxyGML loss (`from loss import ProxyGML`) and its distributed forms (`loss.build_criterion`)."""

from loss.proxygml import ProxyGML

__all__ = ["ProxyGML"]
