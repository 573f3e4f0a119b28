"""The loss section as configs and checkpoints spelled it before loss families, translated to today's.

Before: one flat section, `loss: {name, kwargs, miner, miner_kwargs, mode, proxies_per_class, r, lam, pos_mask,
class_mask, proxy_reg, scale}`, where `name` was `proxygml` or a pytorch-metric-learning loss class. Now:
`loss: {family, mode, proxygml: {proxies_per_class, ...}, pml: {name, kwargs, miner, miner_kwargs}}`
(loss/family.py). Old YAML files, `key=value` overrides and checkpoint configs still load: each old key is
moved to its new place, and a config written in the old spelling gets its errors in the old spelling (a message
about `loss.pml.kwargs` names `loss.kwargs`, and says where it lives now).

    loss, aliases = translate_loss({"name": "ProxyAnchorLoss", "kwargs": {"margin": 0.1}})
    # -> {"family": "pml", "pml": {"name": "ProxyAnchorLoss", "kwargs": {"margin": 0.1}}}, OLD_SPELLING
"""
from __future__ import annotations

from typing import Any

PROXYGML = "proxygml"
PML = "pml"
MOVED = {**{k: PML for k in ("kwargs", "miner", "miner_kwargs")},  # old key of `loss` -> its family's section
         **{k: PROXYGML for k in ("proxies_per_class", "r", "lam", "pos_mask", "class_mask", "proxy_reg", "scale")}}
# {today's key: the old key}: how an error is worded for a config that uses the old spelling anywhere
OLD_SPELLING = {"loss.pml.name": "loss.name",
                **{f"loss.{family}.{key}": f"loss.{key}" for key, family in MOVED.items()}}


def is_legacy(loss: Any) -> bool:
    """True when the mapping `loss` (a config's loss section) holds a key of the old flat spelling."""
    return hasattr(loss, "keys") and any(k == "name" or k in MOVED for k in loss)


def translate_loss(loss: Any) -> tuple[dict, dict[str, str]]:
    """(the loss section in today's spelling, OLD_SPELLING). `loss` is a mapping (a plain dict, or a YAML node's
    dict); it is not changed."""
    out = dict(loss)

    def section(name: str) -> dict:
        out[name] = dict(out.get(name) or {})
        return out[name]

    if "name" in out:
        name = out.pop("name")
        if name == PROXYGML:
            out.setdefault("family", PROXYGML)
        else:
            out.setdefault("family", PML)
            section(PML)["name"] = name
    for key, family in MOVED.items():
        if key in out:
            section(family)[key] = out.pop(key)
    return out, dict(OLD_SPELLING)


def translate_config(config: dict) -> dict:
    """A whole config dict (a checkpoint's `config`) in today's spelling; returned as is when already so."""
    if not isinstance(config, dict) or not is_legacy(config.get("loss")):
        return config
    return {**config, "loss": translate_loss(config["loss"])[0]}


def translate_override(item: str) -> tuple[list[str], dict[str, str]]:
    """A `key=value` override in today's spelling: (the overrides it becomes, OLD_SPELLING or {} when it was in
    today's already). `loss.name=proxygml` -> `loss.family=proxygml`; `loss.name=X` -> `loss.family=pml`,
    `loss.pml.name=X`; `loss.r=0.1` -> `loss.proxygml.r=0.1`; `loss.kwargs.m=0.1` -> `loss.pml.kwargs.m=0.1`."""
    key, sep, value = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or len(parts) < 2 or parts[0] != "loss":
        return [item], {}
    if parts == ["loss", "name"]:
        if value.strip().strip("'\"") == PROXYGML:
            return [f"loss.family={value}"], {**OLD_SPELLING, "loss.family": "loss.name"}
        return [f"loss.family={PML}", f"loss.pml.name={value}"], {**OLD_SPELLING, "loss.family": "loss.name"}
    if parts[1] in MOVED:
        return [".".join(["loss", MOVED[parts[1]], *parts[1:]]) + f"={value}"], dict(OLD_SPELLING)
    return [item], {}


def as_written(message: str, aliases: dict[str, str]) -> str:
    """A config error's message with its leading key spelled as the user wrote it (an old key that moved), and
    where it lives now."""
    for new in sorted(aliases, key=len, reverse=True):
        if message.startswith(new + ":") or message.startswith(new + "."):
            old = aliases[new]
            return f"{old}{message[len(new):]} ({old} is {new} now)"
    return message
