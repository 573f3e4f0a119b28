"""The DeepSpeed JSON (engine.deepspeed_config): precision and ZeRO come from the file, batch size, clipping and
the optimizer from the trainer's config; what cannot run here is refused with the file and key named."""
from __future__ import annotations

import json
import os

import torch

from trainer.errors import UserError

PRECISION_KEYS = ("bf16", "fp16")  # DeepSpeed's own casts of the whole module: not for TrainModule
OURS = ("optimizer", "scheduler")  # sections the trainer owns


class DeepSpeedConfigError(UserError, ValueError):
    """A DeepSpeed JSON that cannot run here; the message names the file and key (a user error: one line, exit 2)."""


def load_ds_config(path: str, *, per_rank_batch: int, world_size: int, grad_clip: float = 0.0,
                   autocast_dtype: torch.dtype | None = None) -> dict:
    """The JSON at `path`, completed with the trainer's batch size and clipping; bad keys raise, named.

    That engine.deepspeed_config is set at all is checked once, at config validation (trainer/config.py)."""
    if not os.path.isfile(path):
        raise DeepSpeedConfigError(f"engine.deepspeed_config: no such file {path!r}")
    with open(path) as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as e:
            raise DeepSpeedConfigError(f"engine.deepspeed_config: {path} is not valid JSON: {e}") from e
    for key in OURS:
        if key in ds:
            raise DeepSpeedConfigError(
                f"{path}: remove {key!r}: the trainer builds the torch optimizer from optim.* (its own param "
                "groups and lrs) and drives the lr schedule from optim.lr_milestones")
    for key in PRECISION_KEYS:
        if ds.get(key, {}).get("enabled", False):
            raise DeepSpeedConfigError(
                f"{path}: {key}.enabled casts the whole module, proxies included, to {key}, but the ProxyGML "
                f'loss runs in fp32; use "torch_autocast": {{"enabled": true, "dtype": '
                f'"{"bfloat16" if key == "bf16" else "float16"}"}} (fp32 weights, {key} compute)')
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise DeepSpeedConfigError(f"{path}: zero_optimization.stage={stage}: engine=deepspeed supports 0, 1, 2 "
                                   "(stage 3 partitions the weights that the loop and evaluation read whole)")
    fp16 = ds.get("torch_autocast", {}).get("enabled", False) and ds["torch_autocast"].get("dtype") in (
        "float16", "fp16", "half")
    if fp16 and stage in (1, 2) and grad_clip > 0:
        raise DeepSpeedConfigError(
            f"{path}: torch_autocast float16 with zero_optimization.stage={stage} and train.grad_clip={grad_clip}: "
            "DeepSpeed 0.19.8 clips the loss-scaled gradients there (measured: updates ~65536x too small); "
            "set train.grad_clip=0, or use bf16 (no loss scale) or stage 0")
    ours = {"train_micro_batch_size_per_gpu": per_rank_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": per_rank_batch * world_size, "gradient_clipping": float(grad_clip)}
    for key, value in ours.items():
        if key in ds and ds[key] != value:
            raise DeepSpeedConfigError(f"{path}: {key}={ds[key]!r} disagrees with the trainer's {value!r} "
                                       "(train.batch_size / train.grad_clip): leave it out of the JSON")
    ds.update(ours)
    if "torch_autocast" not in ds and autocast_dtype is not None:  # follow train.amp, as DDP does
        ds["torch_autocast"] = {"enabled": True, "dtype": str(autocast_dtype).removeprefix("torch.")}
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch SGD under ZeRO: a plain per-partition step
    ds.setdefault("steps_per_print", 2**31 - 1)
    return ds
