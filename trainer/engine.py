"""The engine seam: how the (embedder, criterion) module is wrapped, stepped and its optimizer saved.

    engine = build_engine(cfg, module, optimizer, env)     # cfg.engine.name: ddp | deepspeed
    loss = engine(images, labels)                          # forward of the wrapped module
    engine.backward(loss); engine.step()                   # step: clip, optimizer step, zero grads
    engine.rewrap()                                        # after requires_grad changed (warm-up end)
    engine.optimizer_state_dict() / engine.load_optimizer_state_dict(sd)   # every rank: collective under DeepSpeed

`module` is a `TrainModule`: the embedder and the criterion in one nn.Module, so that DDP all-reduces the
proxies' gradients together with the network's. Parameters the criterion keeps out of DDP (its sharded
mode: each rank owns a block of proxies) come from `criterion.ddp_ignored_parameters()`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


class TrainModule(nn.Module):
    """images, labels -> scalar loss. The loss runs in float32 outside autocast.

    compile: the training forward of the embedder goes through torch.compile (one graph: training batches all
    have the same shape). Evaluation calls the embedder itself, eagerly: compiling it too cost two more graphs
    (no-grad, and the last, smaller batch), about a minute on the demo (H200 run); parameter names are
    unchanged, so checkpoints do not depend on it."""

    def __init__(self, embedder: nn.Module, criterion: nn.Module, compile: bool = False):
        super().__init__()
        self.embedder = embedder
        self.criterion = criterion
        self.compiled = torch.compile(embedder.forward) if compile else None  # a function, not a submodule

    def forward(self, images, labels):
        emb = (self.compiled or self.embedder)(images)
        with torch.autocast(emb.device.type, enabled=False):
            return self.criterion(emb.float(), labels)


def ddp_ignored_names(module: TrainModule) -> list[str]:
    """Fully qualified names (in `module`) of the criterion parameters DDP must not all-reduce."""
    getter = getattr(module.criterion, "ddp_ignored_parameters", None)
    if getter is None:
        return []
    ignored = list(getter())
    by_id = {id(p): n for n, p in module.named_parameters()}
    return [("criterion." + x if not x.startswith("criterion.") else x) if isinstance(x, str) else by_id[id(x)]
            for x in ignored]


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
        if dist.is_initialized():
            dist.all_reduce(part)
        total = total + part
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads.values():
        g.mul_(coef.to(g.device, g.dtype))
    return norm


class DDPEngine:
    def __init__(self, module: TrainModule, optimizer: torch.optim.Optimizer, env, grad_clip: float = 0.0,
                 find_unused_parameters: bool = False):
        self.module, self.optimizer, self.env = module, optimizer, env
        self.grad_clip = grad_clip
        self.find_unused = find_unused_parameters
        self.rewrap()

    def rewrap(self):
        """(Re)build the DDP wrapper: DDP fixes the set of trainable parameters when it is built."""
        self.wrapped = None  # drop the old reducer (and its gradient hooks) first
        ignored = ddp_ignored_names(self.module)
        if ignored:
            DDP._set_params_and_buffers_to_ignore_for_model(self.module, ignored)
        dev = self.env.device
        self.wrapped = DDP(self.module, device_ids=[dev.index] if dev.type == "cuda" else None,
                           find_unused_parameters=self.find_unused)

    def __call__(self, images, labels):
        return self.wrapped(images, labels)

    def backward(self, loss):
        loss.backward()

    def step(self):
        if self.grad_clip > 0:
            clip_grad_norm(self.module, self.grad_clip, set(ddp_ignored_names(self.module)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, sd: dict):
        self.optimizer.load_state_dict(sd)


def build_engine(cfg, module: TrainModule, optimizer, env):
    if cfg.engine.name == "ddp":
        return DDPEngine(module, optimizer, env, cfg.train.grad_clip, cfg.engine.find_unused_parameters)
    if cfg.engine.name == "deepspeed":
        try:
            from trainer.deepspeed_engine import DeepSpeedEngine
        except ImportError as e:
            raise NotImplementedError("engine.name=deepspeed: trainer/deepspeed_engine.py is not there yet") from e
        return DeepSpeedEngine(cfg, module, optimizer, env)
    raise ValueError(f"engine.name: unknown engine {cfg.engine.name!r}")
