"""engine.name=ddp: the TrainModule under DistributedDataParallel (the criterion's rank-owned parameters kept
out, see loss.distributed.ddp_ignore), and clipping by the global gradient norm over replicated and sharded
parameters."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from collectives import all_reduce_
from loss.distributed import ddp_ignore, ddp_ignored_names
from trainer.engines.train_module import TrainModule


def clip_grad_norm(module: nn.Module, max_norm: float, sharded: set[str]) -> torch.Tensor:
    """Clip by the global gradient norm. DDP's gradients are the same on every rank; the `sharded` ones
    (a block of proxies per rank) are summed over ranks first, so every rank scales by the same factor."""
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    dev = next(module.parameters()).device

    def sum_sq(names):
        return sum((grads[n].detach().float().pow(2).sum().to(dev) for n in names), torch.zeros((), device=dev))

    total = sum_sq([n for n in grads if n not in sharded])
    if sharded:
        part = sum_sq([n for n in grads if n in sharded])
        all_reduce_(part)
        total = total + part
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads.values():
        g.mul_(coef.to(g.device, g.dtype))
    return norm


class DDPEngine:
    """The trainer's `Engine` over torch's DistributedDataParallel (also on one process)."""

    def __init__(self, module: TrainModule, optimizer: torch.optim.Optimizer, env, *, grad_clip: float,
                 find_unused_parameters: bool):
        self.module, self.optimizer, self.env = module, optimizer, env
        self.grad_clip = grad_clip
        self.find_unused = find_unused_parameters
        self.rewrap()

    def rewrap(self):
        """(Re)build the DDP wrapper: DDP fixes the set of trainable parameters when it is built."""
        self.wrapped = None  # drop the old reducer (and its gradient hooks) first
        ddp_ignore(self.module, self.module.criterion)  # the criterion's rank-owned parameters and buffers
        dev = self.env.device
        self.wrapped = DDP(self.module, device_ids=[dev.index] if dev.type == "cuda" else None,
                           find_unused_parameters=self.find_unused)

    def __call__(self, images, labels):
        return self.wrapped(images, labels)

    def backward(self, loss):
        loss.backward()

    def step(self):
        if self.grad_clip > 0:
            clip_grad_norm(self.module, self.grad_clip, set(ddp_ignored_names(self.module, self.module.criterion)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, sd: dict):
        self.optimizer.load_state_dict(sd)
