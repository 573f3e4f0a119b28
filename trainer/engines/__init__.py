"""The engine seam (`Engine`): how the (embedder, criterion) TrainModule is wrapped, stepped and its optimizer
saved, and `build_engine`, which makes one from explicit settings (engine.name ddp | deepspeed).

    engine = build_engine(name, module, optimizer, env, grad_clip=..., find_unused_parameters=...,
                          deepspeed_config=..., per_rank_batch=..., amp_dtype=..., checkpoint_dir=...,
                          keep_last=...)
    loss = engine(images, labels)                          # forward of the wrapped module
    engine.backward(loss); engine.step()                   # step: clip, optimizer step, zero grads
    engine.rewrap()                                        # after requires_grad changed (warm-up end)
    engine.optimizer.param_groups                          # the torch optimizer's group dicts (name, lr, ...)
    engine.optimizer_state_dict() / engine.load_optimizer_state_dict(sd)   # every rank: collective under DeepSpeed

Rooms: train_module.py (TrainModule), ddp.py (DDPEngine, clip_grad_norm), deepspeed.py (DeepSpeedEngine) with
deepspeed_env.py (process group, quiet logs, no CPU JIT build), deepspeed_config.py (the JSON), zero_state.py
(ZeRO partitions in and out) and deepspeed_export.py (a DeepSpeed checkpoint -> a plain state dict, its CLI).
Parameters the criterion keeps out of DDP come from its `ddp_ignored_parameters()` (loss.distributed.ddp_ignore).
"""
from __future__ import annotations

from typing import Protocol, cast, runtime_checkable

import torch

from trainer.engines.ddp import DDPEngine
from trainer.engines.train_module import TrainModule


@runtime_checkable
class Engine(Protocol):
    """What the loop calls; `optimizer_state_dict` and `load_optimizer_state_dict` are called on every rank."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None:
        """Clip (grad_clip > 0), optimizer step, zero the gradients."""
        ...

    def rewrap(self) -> None:
        """Rebuild the wrapper after parameters' requires_grad changed (the end of the warm-up)."""
        ...

    @property
    def optimizer(self):
        """An optimizer whose `.param_groups` are the torch optimizer's group dicts."""
        ...

    def optimizer_state_dict(self) -> dict: ...

    def load_optimizer_state_dict(self, sd: dict) -> None: ...


def build_engine(name: str, module: TrainModule, optimizer: torch.optim.Optimizer, env, *, grad_clip: float,
                 find_unused_parameters: bool, deepspeed_config: str | None, per_rank_batch: int,
                 amp_dtype: torch.dtype | None, checkpoint_dir: str, keep_last: int) -> Engine:
    """The engine `name` (ddp | deepspeed) over `module`. DDP reads grad_clip and find_unused_parameters;
    DeepSpeed reads the JSON at deepspeed_config, per_rank_batch, grad_clip, amp_dtype (train.amp: used when
    the JSON has no torch_autocast section), and keeps its checkpoints in <checkpoint_dir>/deepspeed (the last
    keep_last)."""
    if name == "ddp":
        return DDPEngine(module, optimizer, env, grad_clip=grad_clip, find_unused_parameters=find_unused_parameters)
    if name == "deepspeed":
        from trainer.engines.deepspeed import DeepSpeedEngine
        config_path = cast(str, deepspeed_config)  # set for this engine: the config's check
        return DeepSpeedEngine(module, optimizer, env, config_path=config_path, per_rank_batch=per_rank_batch,
                               grad_clip=grad_clip, amp_dtype=amp_dtype, checkpoint_dir=checkpoint_dir,
                               keep_last=keep_last)
    raise ValueError(f"engine.name: unknown engine {name!r}")
