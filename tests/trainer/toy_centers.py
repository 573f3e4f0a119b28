"""A toy loss family for the extension test, with a table cut by classes across ranks: center loss,
L = mean_i (1 - cos(x_i, c_{y_i})) over the global batch, one learned center per class. Mode "local": every rank
holds all centers (DDP averages their gradients); "sharded": rank r holds the centers of its block of classes
(loss/row_sharded.py), sees every rank's embeddings and computes the terms of its classes. Registered by the
test with one line, `register_family(CentersFamily())`."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from collectives import all_gather_rows, all_reduce_, block, world
from loss.criterion import CriterionBase
from loss.family import LossFamily, positive
from loss.row_sharded import RowSharded


@dataclass
class CentersConfig:
    init_scale: float = positive(1.0)  # the initial centers: N(0, init_scale^2) per coordinate


def initial_centers(num_classes: int, dim: int, start: int, stop: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_classes, dim, generator=g) * scale)[start:stop].clone()


def center_terms(x: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, first_class: int) -> torch.Tensor:
    """(1 - cos) of each row of x (M, dim) and its class's center; labels counted from `first_class`."""
    return 1 - (F.normalize(x, dim=1) * F.normalize(centers, dim=1)[labels - first_class]).sum(1)


class LocalCenterLoss(CriterionBase):
    def __init__(self, num_classes: int, dim: int, init_scale: float, seed: int):
        super().__init__()
        self.num_classes, self.last_parts = num_classes, {}
        self.centers = nn.Parameter(initial_centers(num_classes, dim, 0, num_classes, init_scale, seed))

    def forward(self, embeddings, labels):
        return center_terms(embeddings, labels, self.centers, 0).mean()


class ShardedCenterLoss(RowSharded):
    sharded_tables = ("centers",)
    rows_per_class = 1

    def __init__(self, num_classes: int, dim: int, init_scale: float, seed: int, group=None):
        super().__init__()
        self.num_classes, self.group, self.last_parts = num_classes, group, {}
        size, rank = world(group)
        start, stop = block(num_classes, size, rank)
        self.hold_rows(start, stop)
        self.centers = nn.Parameter(initial_centers(num_classes, dim, start, stop, init_scale, seed))

    def ddp_ignored_parameters(self):
        return ["centers"]

    def forward(self, embeddings, labels):
        x, _ = all_gather_rows(embeddings, self.group, with_grad=True)
        y, _ = all_gather_rows(labels, self.group)
        own = (y >= self.row_start) & (y < self.row_stop)
        mine = center_terms(x[own], y[own], self.centers, self.row_start).sum() / y.numel()
        total = mine.detach().clone()
        all_reduce_(total, group=self.group)
        return mine + (total - mine.detach())  # the global loss; gradients through this rank's terms


class CentersFamily(LossFamily):
    """Center loss, local or class-sharded."""

    name = "centers"
    section = CentersConfig
    modes = ("local", "sharded")

    def build(self, section, mode, num_classes, dim, *, seed=0):
        cls = ShardedCenterLoss if mode == "sharded" else LocalCenterLoss
        return cls(num_classes, dim, section.init_scale, seed)

    def describe(self, section, mode):
        return f"center loss ({mode})"

    def layout(self, mode):
        return "sharded" if mode == "sharded" else "replicated"
