"""The ProxyGML loss (`from loss import ProxyGML`), its distributed forms (`loss.build_criterion`), the contract
every loss form implements (`loss.Criterion`, loss/criterion.py) and the loss families a config chooses from
(`loss.family`, loss/family.py): each registered here, one line each."""

from loss.criterion import Criterion
from loss.distributed import build_criterion, ddp_ignore
from loss.family import LossContext, LossFamily, families, get_family, register_family, unregister_family
from loss.pml_family import MetricLossFamily
from loss.proxygml import ProxyGML
from loss.proxygml_family import ProxyGMLFamily

register_family(ProxyGMLFamily())
register_family(MetricLossFamily())

__all__ = ["Criterion", "LossContext", "LossFamily", "ProxyGML", "build_criterion", "ddp_ignore", "families",
           "get_family", "register_family", "unregister_family"]
