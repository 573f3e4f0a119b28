"""What may change when a run resumes: the checkpoint's config against the current one, before anything is touched.

    changes = check_resume(saved_cfg, cfg, path, at_epoch_start=batch_in_epoch == 0)  # ConfigError if refused
    apply_optim_hyperparameters(optimizer, scheduler, cfg.optim)                          # after the restore

Keys are of three kinds:
- FIXED: the saved weights or optimizer state would not fit or would mean something else (model shape, loss
  family and the keys the family fixes (loss/family.py: ProxyGML's N, the pytorch-metric-learning loss class),
  optimizer, engine); a mode change that crosses checkpoint layouts (the family's `layout`). A change refuses
  to resume, in one line naming the key, both values and the ways out (keep the old value, or start a new run).
- AT_EPOCH_START: the data position (batch index inside the epoch) would point elsewhere. They may change only
  when the checkpoint sits at an epoch boundary.
- everything else carries over (learning rates, epochs, eval, logging, workers, world size ...), each change
  logged as `key: old -> new`. Optimizer hyperparameters are applied on top of the restored optimizer and
  schedule (a restore would otherwise bring back the saved ones).
"""
from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from collections import Counter
from typing import cast

from omegaconf import DictConfig, OmegaConf

from data_shards import batches_per_epoch
from loss import families, get_family
from trainer.config import ConfigError
from trainer.config_legacy import translate_config
from trainer.redact import redact_tree

FIXED = {
    "model.backbone": "the saved weights belong to another network",
    "model.dim": "the saved embedding layer and proxies have another width",
    "model.pooling": "the saved embedding layer expects another pooled width",
    "model.normalize": "the saved proxies were learnt for another embedding",
    "model.small_cnn_width": "the saved weights have another shape",
    "model.backbone_kwargs": "the saved weights may have other shapes (img_size) or another network",
    "optim.layer_decay": "the saved optimizer state has another set of parameter groups",
    "loss.family": "the saved criterion is another loss",
    "optim.name": "the saved optimizer state belongs to another optimizer",
    "engine.name": "the saved optimizer state is in another engine's format",
    "run.name": "these checkpoints belong to another run (a shared checkpoint.dir?); give each run its own",
}
AT_EPOCH_START = {
    "train.batch_size": "the checkpoint is inside an epoch whose batches were cut for the old batch size",
}
IGNORED = {"model.pretrained", "model.weights_file", "checkpoint.resume"}  # the checkpoint has the weights


def fixed_keys() -> dict[str, str]:
    """FIXED and every registered loss family's fixed keys (`loss.<family>.<key>`), {dotted key: why}."""
    return {**FIXED, **{f"loss.{name}.{key}": why for name, family in families().items()
                        for key, why in family.fixed_keys.items()}}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("kwargs", "miner_kwargs", "backbone_kwargs"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume(saved: dict, cfg: DictConfig, path: str, at_epoch_start: bool,
                 saved_data: dict | None = None, data_now: dict | None = None) -> list[str]:
    """Compare checkpoint `path`'s config dict `saved` with `cfg`; the changes that carry over, as
    `key: old -> new` lines. Raises ConfigError (one line: key, both values, the ways out) for a change that
    cannot carry over. `saved_data` / `data_now`: {"classes": int, "samples": int} of the train split then
    and now (the data root may move; its content may not)."""
    # saved configs hold no credentials: compare without them
    now = redact_tree(flatten(cast(dict, OmegaConf.to_container(cfg, resolve=True))))
    then = redact_tree(flatten(translate_config(saved)))
    ways_out = (f"; resume with {{key}}={{old}}, or start a new run (another run.name=..., or "
                f"checkpoint.resume=false to move this run's checkpoints to {cfg.run.name}/previous/ and start over)")
    changes = []
    fixed = fixed_keys()
    family = get_family(cfg.loss.family)
    for key in sorted(set(now) | set(then)):
        if key in IGNORED or key not in then or now.get(key) == then.get(key):
            continue
        old, new = then.get(key), now.get(key)
        reason = fixed.get(key)
        if key == "loss.mode" and then.get("loss.family") == family.name and family.layout(old) != family.layout(new):
            reason = f"{family.layout(old)} and {family.layout(new)} criteria keep different checkpoint layouts"
        if key in AT_EPOCH_START and not at_epoch_start:
            reason = AT_EPOCH_START[key]
        if reason:
            raise ConfigError(f"{key}: the checkpoint {path} was written with {key}={old!r}, now {new!r}: {reason}"
                              + ways_out.format(key=key, old=_cli(old)))
        changes.append(f"{key}: {old!r} -> {new!r}")
    if saved_data and data_now:
        if saved_data.get("class_names") not in (None, data_now.get("class_names")):
            raise ConfigError(f"data.root: the checkpoint {path} trained on other classes than those of "
                              f"{cfg.data.root}/{cfg.data.train_split} (class names differ); point data.root and "
                              f"data.train_split at the split it trained on, or start a new run (another run.name=...)")
        if saved_data.get("classes") not in (None, data_now["classes"]):
            raise ConfigError(f"data.root: the checkpoint {path} trained on {saved_data['classes']} classes, "
                              f"{cfg.data.root}/{cfg.data.train_split} has {data_now['classes']}; point data.root at "
                              f"the split it trained on, or start a new run (another run.name=...)")
        if saved_data.get("samples") not in (None, data_now["samples"]):
            if not at_epoch_start:
                raise ConfigError(f"data.root: the checkpoint {path} is inside an epoch of {saved_data['samples']} "
                                  f"samples, {cfg.data.root}/{cfg.data.train_split} has {data_now['samples']}; point "
                                  f"data.root at the split it trained on, or start a new run (another run.name=...)")
            changes.append(f"train split samples: {saved_data['samples']} -> {data_now['samples']}")
    return changes


def class_digest(class_names: list) -> str:
    """A short sha256 of a split's class names in label order: which classes the proxies belong to."""
    return hashlib.sha256(json.dumps([str(c) for c in class_names]).encode()).hexdigest()[:16]


def at_epoch_end(state: dict) -> bool:
    """True when checkpoint `state` was saved after the last batch of its epoch (before the epoch's end work)."""
    batches = batches_per_epoch(state.get("train_samples") or 0, state["config"]["train"]["batch_size"])
    return 0 < batches <= state["batch_in_epoch"]


def _cli(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


GROUP_LR = {"backbone": "lr", "head": "head_lr", "proxies": "proxy_lr"}


def apply_optim_hyperparameters(optimizer, scheduler, cfg_optim) -> None:
    """Put the current config's learning rates (through the schedule's milestones and gamma), weight decay, eps
    and momentum on a restored optimizer and MultiStepLR schedule. With an unchanged config this changes
    nothing; with a changed one the new values hold from this epoch on, as if the run had used them from the
    start (lr = base x gamma^(milestones passed))."""
    scheduler.milestones = Counter(cfg_optim.lr_milestones)
    scheduler.gamma = cfg_optim.lr_gamma
    passed = bisect_right(sorted(cfg_optim.lr_milestones), scheduler.last_epoch)
    bases = []
    for group in optimizer.param_groups:
        if group.get("name") in GROUP_LR:  # lr_scale: optim.layer_decay's backbone groups (trainer.build)
            base = cfg_optim[GROUP_LR[group["name"]]] * group.get("lr_scale", 1.0)
        else:
            base = group["initial_lr"]
        group["initial_lr"] = base
        group["lr"] = base * cfg_optim.lr_gamma ** passed
        group["weight_decay"] = cfg_optim.weight_decay * group.get("wd_scale", 1.0)
        if "eps" in group:
            group["eps"] = cfg_optim.eps
        if "momentum" in group:
            group["momentum"] = cfg_optim.momentum
        bases.append(base)
    scheduler.base_lrs = bases
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
