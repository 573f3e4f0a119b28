"""ShardedProxyGML: ProxyGML with a contiguous block of classes, their proxies (outside DDP) and their optimizer
state per rank; the full table exists only when gathered for a checkpoint (``full_state_dict``,
``optimizer_state_to_full``). See loss/distributed.py for what the mode computes."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from collectives import all_gather_rows, all_reduce_, block, world
from loss.proxygml import (
    ProxyGMLBase,
    class_scores,
    class_sums,
    init_proxy_rows,
    proxy_cross_entropy_sum,
    row_losses,
    selected_similarity,
    softmax_inputs,
)
from loss.row_sharded import RowSharded
from loss.sharded_topk import ScaleGrad, ShardedLogSumExp, sharded_topk


class ShardedProxyGML(RowSharded, ProxyGMLBase):
    """ProxyGML with a contiguous block of classes (and their proxies) per rank; see loss/distributed.py.

    ``proxies`` (C_r*N, dim) are this rank's, global rows ``proxy_start:proxy_stop``; ``selection_counts``
    likewise. ``candidate_factor``: each rank first ranks ceil(factor * k / W) local candidates per sample
    (exact whatever it is: a rank whose list is too short makes all ranks redo it with min(k, C_r*N));
    the candidate lists are the largest memory term at millions of classes. The initial rows are this rank's
    rows of the table every mode draws for ``seed`` (``init_proxy_rows``: blocks of global rows, each from a
    generator seeded by (``seed``, block)): the same table as ``local`` and ``gather``, on any world size.
    """

    sharded_tables = ("proxies",)

    def __init__(self, num_classes: int, dim: int, *args, group=None, seed: int = 0, candidate_factor: float = 2.0,
                 **kwargs):
        super().__init__(num_classes, dim, *args, group=group, **kwargs)  # the hyperparameters: ProxyGMLBase
        size, rank = world(group)
        if num_classes < size:
            raise ValueError(f"num_classes ({num_classes}) must be >= the world size ({size}) in sharded mode")
        if not candidate_factor > 0:
            raise ValueError(f"candidate_factor must be > 0, got {candidate_factor!r}")
        self.candidate_factor = float(candidate_factor)
        self.rows_per_class = self.proxies_per_class  # the rows of the sharded table per class (RowSharded)
        start, stop = block(num_classes, size, rank)
        n = self.proxies_per_class
        self.hold_classes(start, stop, init_proxy_rows(num_classes * n, dim, start * n, stop * n, seed))
        self.hold_rows(start, stop)

    def extra_repr(self) -> str:
        return f"mode=sharded, classes=[{self.class_start}, {self.class_stop}), " + super().extra_repr()

    def ddp_ignored_parameters(self) -> list[str]:
        """Names (relative to this module) that DDP must leave alone: the rank-owned proxies and counts."""
        return ["proxies", "selection_counts"]

    # the subgraphs across shards
    def _select(self, sim: Tensor, labels: Tensor, out: dict) -> Tensor:
        """Local indices (M, *) of this rank's chosen proxies; out["mask"] marks the real ones."""
        n, k = self.proxies_per_class, self.k
        owned = (labels >= self.class_start) & (labels < self.class_stop)
        own = (labels - self.class_start).clamp(0, self.class_stop - self.class_start - 1)[:, None] * n
        own = own + torch.arange(n, device=sim.device)
        own_mask = owned[:, None].expand(-1, n)
        if self.pos_mask and k <= n:  # only own proxies: all on the owning rank
            order = sim.gather(1, own).sort(dim=1, descending=True, stable=True).indices[:, :k]
            out["mask"] = own_mask[:, :k]
            return own.gather(1, order)
        need = k - n if self.pos_mask else k
        if self.pos_mask:
            saved = sim.gather(1, own)
            sim.scatter_(1, own, torch.where(own_mask, float("-inf"), saved))
        size = world(self.group)[0]
        candidates = math.ceil(self.candidate_factor * need / size)
        idx, mask = sharded_topk(sim, need, self.proxy_start, self.group, candidates)
        if not self.pos_mask:
            out["mask"] = mask
            return idx
        sim.scatter_(1, own, saved)
        out["mask"] = torch.cat([own_mask, mask], dim=1)
        return torch.cat([own, idx], dim=1)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        device_type, dtype, mm_dtype = self.prepare(embeddings, labels)
        size, _ = world(self.group)
        n = self.proxies_per_class
        with torch.autocast(device_type, enabled=False):
            x, labels = embeddings.to(dtype), labels.long()
            if size > 1:
                x, _ = all_gather_rows(ScaleGrad.apply(x, float(size)), self.group, with_grad=True)
                labels, _ = all_gather_rows(labels, self.group)
            x, p = F.normalize(x, dim=1), F.normalize(self.proxies.to(dtype), dim=1)
            out: dict = {}
            vals, idx = selected_similarity(x, p, lambda sim: self._select(sim, labels, out))
            mask = out["mask"]
            with torch.no_grad():
                self.selection_counts += torch.bincount(idx[mask], minlength=self.selection_counts.numel())
            z, seg_cls, valid = class_scores(vals * self.scale if self.scale != 1.0 else vals,
                                             idx // n + self.class_start, n, mask)
            logits, z_own, has_target = softmax_inputs(z, seg_cls, valid, labels,
                                                       self.class_stop - self.class_start, self.class_mask)
            rows_s, loss_s = self._sample_part(logits, z_own, has_target, size)
            reg_sum, loss_p = self._proxy_part(p, mm_dtype, size)
            self.last_parts = {"loss_s": loss_s, "loss_p": loss_p}
            surrogate, value = rows_s.sum() / rows_s.shape[0], loss_s
            if self.uses_proxy_reg:
                num_proxies = self.num_classes * n
                surrogate = surrogate + self.lam * reg_sum / num_proxies
                value = value + self.lam * loss_p
            return value + (surrogate - surrogate.detach())

    def _sample_part(self, logits: Tensor, z_own: Tensor, has_target: Tensor, size: int):
        """(per-row surrogate with this shard's gradient, global L^s detached)."""
        target = torch.stack([z_own.detach(), has_target.to(z_own.dtype)])
        all_reduce_(target, group=self.group)  # the owner holds z_own and the flag; others 0
        z_own_all, ok = target[0], target[1] > 0
        safe = torch.where(ok[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        lse = ShardedLogSumExp.apply(safe, self.group) if size > 1 else torch.logsumexp(safe, dim=1)
        values = row_losses(lse.detach()[:, None], z_own_all, ok)  # logsumexp of one column is itself
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        return torch.where(ok, lse - z_own, zero), values.mean()

    def _proxy_part(self, p: Tensor, mm_dtype: torch.dtype, size: int):
        """(this rank's Σ of L^p cross-entropies with gradients, global L^p detached)."""
        if not self.uses_proxy_reg:
            zero = torch.zeros((), dtype=p.dtype, device=p.device)
            return zero, zero
        sums = class_sums(p, self.proxies_per_class)
        if size > 1:
            sums, _ = all_gather_rows(sums, self.group, with_grad=True)
        targets = torch.arange(self.proxy_start, self.proxy_stop, device=p.device) // self.proxies_per_class
        reg_sum = proxy_cross_entropy_sum(p, sums, targets, self.chunk_elements, mm_dtype)
        total = reg_sum.detach().clone()
        all_reduce_(total, group=self.group)
        return reg_sum, total / (self.num_classes * self.proxies_per_class)

    # checkpoints and statistics across world sizes: loss/row_sharded.py
    def global_selection_counts(self) -> Tensor:
        """The (C*N,) selection counts of all shards (collective: call on every rank)."""
        return self.gather_rows(self.selection_counts)
