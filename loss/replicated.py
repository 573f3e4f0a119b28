"""ReplicatedProxyGML: ProxyGML with the whole proxy table on every rank (inside DDP), modes ``local`` (each
rank's subgraphs cover its own samples) and ``gather`` (every rank builds the subgraphs of the global batch);
see loss/distributed.py for what each mode computes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from collectives import all_gather_rows, all_reduce_, block, world
from loss.proxygml import ProxyGML


class ReplicatedProxyGML(ProxyGML):
    """ProxyGML with proxies replicated on every rank (inside DDP): ``mode`` is ``local`` or ``gather``."""

    def __init__(self, num_classes: int, dim: int, *args, mode: str = "gather", group=None, **kwargs):
        super().__init__(num_classes, dim, *args, **kwargs)  # the hyperparameters: ProxyGMLBase
        if mode not in ("local", "gather"):
            raise ValueError(f"mode must be 'local' or 'gather', got {mode!r}")
        self.mode, self.group = mode, group

    def extra_repr(self) -> str:
        return f"mode={self.mode}, " + super().extra_repr()

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        device_type, dtype, mm_dtype = self.prepare(embeddings, labels)
        size, rank = world(self.group)
        with torch.autocast(device_type, enabled=False):
            x, labels = embeddings.to(dtype), labels.long()
            if self.mode == "gather" and size > 1:
                x, _ = all_gather_rows(x, self.group, with_grad=True)
                labels, _ = all_gather_rows(labels, self.group)
            p = F.normalize(self.proxies.to(dtype), dim=1)
            rows = self.sample_losses(F.normalize(x, dim=1), p, labels)
            num_proxies = p.shape[0]
            if self.uses_proxy_reg:
                start, stop = block(num_proxies, size, rank)
                reg_sum = self.proxy_loss_sum(p, slice(start, stop), mm_dtype)
            else:
                reg_sum = torch.zeros((), dtype=dtype, device=x.device)
            local = self.mode == "local"
            stats = torch.stack([rows.detach().sum() if local else rows.new_zeros(()),
                                 rows.new_tensor(float(rows.shape[0] if local else 0)), reg_sum.detach()])
            all_reduce_(stats, group=self.group)
            num_samples = stats[1] if local else rows.shape[0]
            loss_s = stats[0] / num_samples if local else rows.detach().mean()
            loss_p = stats[2] / num_proxies
            self.last_parts = {"loss_s": loss_s, "loss_p": loss_p}
            surrogate = rows.sum() / num_samples * (size if local else 1)
            value = loss_s
            if self.uses_proxy_reg:
                surrogate = surrogate + self.lam * size * reg_sum / num_proxies
                value = value + self.lam * loss_p
            return value + (surrogate - surrogate.detach())

    def global_selection_counts(self) -> Tensor:
        """Selection counts of the global batch (collective in ``local`` mode: call on every rank)."""
        counts = self.selection_counts.clone()
        if self.mode == "local":
            all_reduce_(counts, group=self.group)
        return counts
