"""Pretrained weights: got once on a connected machine, then loaded exactly or not at all.

    python -m trainer.weights fetch NAME --out FILE   # NAME: bninception | any timm model (resnet50,
                                                       # vit_small_patch16_224.augreg_in21k_ft_in1k, ...)
    loaded = load_exact(net, FILE, backbone="resnet50", classifier=("fc",))   # -> Loaded, or WeightsError

`load_exact` reads a file without running code (safetensors, or `torch.load(weights_only=True)`), unwraps the
common containers (a checkpoint dict holding the weights under 'state_dict', 'model', 'module', ...; one common
key prefix such as DDP's 'module.' or a wrapper's 'backbone.net.'), lets timm adapt a file of the same
architecture to the model's settings (its `checkpoint_filter_fn`: e.g. a ViT's position embedding resampled to
another input size), and then requires that every parameter and buffer of `net` comes from the file with its
shape (the classifier the file may hold is not used; BatchNorm's `num_batches_tracked` counter, which old files
lack, may be absent). Anything else is a `WeightsError` (a UserError: one line, exit 2) naming the file, how many
tensors matched, the first unmatched keys on each side and the fix.

Without a file (`model.pretrained=true`, no `model.weights_file`) `pretrained_state_dict(NAME)` takes the weights
from a local cache (the hub's or torch's) or, when the source answers within seconds, downloads them; an
unreachable source is a WeightsError naming the key and the fetch command, at once (no minute of hub retries).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import typing
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
from torch import nn

from trainer.errors import UserError

# where a checkpoint dict keeps its weights, most specific first (timm, Lightning, DDP, ours: 'model')
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network",
                  "weights", "params", "state_dict_ema", "model_ema", "ema")
OPTIONAL_SUFFIXES = (".num_batches_tracked",)  # BatchNorm's step counter: absent from old files, not a weight
REACH_TIMEOUT_S = 5.0
FETCHING = False  # set by the fetch command: errors speak of the command, not of the config keys
SHOW = 3  # unmatched keys named on each side


class WeightsError(UserError):
    """A weights file or source that cannot give the backbone all its tensors; the message says the fix."""


def fetch_command(name: str, out: str | None = None) -> str:
    return f"python -m trainer.weights fetch {name} --out {out or default_file(name)}"


def default_file(name: str) -> str:
    return name.replace("/", "_") + ".pth"


# ----------------------------------------------------------------------------- reading a file


def read_file(path: str, key: str = "model.weights_file") -> dict[str, torch.Tensor]:
    """The flat {name: tensor} a weights file holds (unwrapped from a checkpoint dict); WeightsError when the
    file is absent, executes code or holds no weights. Never unpickles anything but tensors and containers."""
    if not os.path.isfile(path):
        raise WeightsError(f"{key}: no file {path!r}")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file
            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input, told in one line
        from trainer.safe_load import blocked_object
        blocked = blocked_object(e)  # torch's own message then suggests turning its safety off: not repeated here
        first = (f"it holds {blocked}" if blocked else
                 (str(e).strip().splitlines() or [type(e).__name__])[0][:200])
        raise WeightsError(f"{key}: {path} is not a weights file that loads without running code "
                           f"(safetensors, or torch.save of tensors): {first}") from None
    return unwrap(obj, path, key)


def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"  # 8-byte little-endian header length, then the JSON header


def unwrap(obj, path: str = "<weights>", key: str = "model.weights_file") -> dict[str, torch.Tensor]:
    """A state dict itself, or the one a checkpoint dict holds under one of CONTAINER_KEYS (nested too)."""
    seen = []
    while isinstance(obj, Mapping):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) * 2 >= len(obj):
            return tensors
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        seen.append(inner)
        obj = obj[inner]
    keys = list(obj)[:6] if isinstance(obj, Mapping) else type(obj).__name__
    raise WeightsError(f"{key}: {path} holds no state dict (found {keys}{' under ' + '/'.join(seen) if seen else ''}"
                       f"); give a file of tensors, e.g. from `{fetch_command('NAME')}`")


# ----------------------------------------------------------------------------- matching a file to a module


@dataclass(frozen=True)
class Loaded:
    """What was loaded: the source, the tensors matched (all of the module's), the prefix stripped, unused keys."""
    source: str
    matched: int
    prefix: str
    unused: tuple[str, ...]  # the file's keys not used: its classifier (or what lies outside the prefix)

    def describe(self) -> str:
        extra = f", prefix {self.prefix!r} stripped" if self.prefix else ""
        unused = f", {len(self.unused)} unused ({_names(self.unused)})" if self.unused else ""
        return f"{self.source}: all {self.matched} backbone tensors matched{extra}{unused}"


def _names(keys, n: int = SHOW) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "") if keys else "none"


def common_prefix(file_keys, model_keys) -> str:
    """The prefix p ('' included) under which the most file keys, stripped of p, are model keys."""
    model_keys = set(model_keys)
    counts: Counter[str] = Counter()
    for k in file_keys:
        if k in model_keys:
            counts[""] += 1
        for i, ch in enumerate(k):
            if ch == "." and k[i + 1:] in model_keys:
                counts[k[:i + 1]] += 1
    return max(counts, key=lambda p: (counts[p], -len(p))) if counts else ""


def _is_classifier(key: str, classifier: tuple[str, ...]) -> bool:
    return any(key == c or key.startswith(c + ".") for c in classifier)


def load_exact(net: nn.Module, weights, *, backbone: str, classifier: tuple[str, ...] = (),
               filter_fn=None, source: str | None = None, key: str = "model.weights_file",
               check_only: bool = False) -> Loaded:
    """Load every parameter and buffer of `net` from `weights` (a path, or a {name: tensor} already read), or
    raise WeightsError before touching `net`. `classifier`: key prefixes of the file that may go unused (the
    architecture's classifier); `filter_fn(state, net)`: timm's adaptation of a file to the model's settings.
    `check_only`: match without loading (`net` may live on the meta device)."""
    if isinstance(weights, str):
        source = source or weights
        state = read_file(weights, key)
    else:
        state, source = unwrap(weights, source or "<weights>", key), source or "<weights>"
    target = net.state_dict()
    prefix = common_prefix(state, target)
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outside = [k for k in state if not k.startswith(prefix)]
    if filter_fn is not None:
        with contextlib.suppress(Exception):  # a filter that does not apply to this file: match it as it is
            inside = dict(filter_fn(dict(inside), net))
    required = [k for k in target if not k.endswith(OPTIONAL_SUFFIXES)]
    missing = [k for k in required if k not in inside]
    shapes = [k for k in target if k in inside and tuple(inside[k].shape) != tuple(target[k].shape)]
    unexpected = [k for k in inside if k not in target and not _is_classifier(k, classifier)]
    if missing or shapes or unexpected:
        matched = sum(1 for k in required if k in inside and k not in shapes)
        where = f" (prefix {prefix!r} stripped)" if prefix else ""
        shape_note = "; shapes differ (file vs model): " + ", ".join(
            f"{k} {tuple(inside[k].shape)} vs {tuple(target[k].shape)}" for k in shapes[:SHOW]) if shapes else ""
        raise WeightsError(
            f"{key}: {source} does not fit {backbone}: {matched} of {len(required)} tensors matched{where}; "
            f"missing from the file: {_names(missing)}; in the file only: {_names(unexpected)}{shape_note}. "
            f"Fix: give the weights of {backbone} (`{fetch_command(backbone)}`) or set model.backbone"
            + (" (and model.backbone_kwargs) to the file's architecture and settings" if shapes and not
               (missing or unexpected) else " to the file's architecture"))
    if not check_only:
        result = net.load_state_dict({k: v for k, v in inside.items() if k in target}, strict=False)
        assert all(k.endswith(OPTIONAL_SUFFIXES) for k in result.missing_keys), result.missing_keys
    unused = tuple(k for k in inside if k not in target) + tuple(outside)
    return Loaded(source=source, matched=len(required), prefix=prefix, unused=unused)


# ----------------------------------------------------------------------------- sources (cache, then network)


def reachable(url: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """None when `url` answers within `timeout` seconds with success (or 405: no HEAD), else the reason in words
    (an error status is often a proxy or firewall refusing). Bounded as a whole (name resolution included, which
    urllib's timeout does not cover)."""
    answer = []

    def head():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answer.append(None)
        except urllib.error.HTTPError as e:
            answer.append(None if e.code == 405 else f"HTTP {e.code} {e.reason}")
        except (urllib.error.URLError, OSError, ValueError) as e:
            answer.append(str(getattr(e, "reason", e)))

    thread = threading.Thread(target=head, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return answer[0] if answer else f"no answer within {timeout:g} s"


def _unreachable(name: str, where: str, why: str) -> WeightsError:
    if FETCHING:
        return WeightsError(f"fetch {name}: its weights come from {where}, which this machine cannot reach ({why}); "
                            f"run `{fetch_command(name)}` on a connected machine and copy the file here")
    return WeightsError(f"model.pretrained: the weights of {name} come from {where}, which this machine cannot "
                        f"reach ({why}); on a connected machine run `{fetch_command(name)}`, then give "
                        f"model.weights_file={default_file(name)} (or model.pretrained=false to start from random "
                        f"weights)")


def pretrained_state_dict(name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The published ImageNet weights of backbone `name` ({name: tensor}, where they came from): a local cache
    first, else a download when the source answers within REACH_TIMEOUT_S; WeightsError otherwise."""
    if name == "bninception":
        return _bninception_state_dict()
    return _timm_state_dict(name)


def check_source(name: str, weights_file: str = "") -> None:
    """Within seconds: the weights file exists, or the published weights of `name` are cached or their source
    answers; else WeightsError (one line naming the key and the fetch command)."""
    if weights_file:
        if not os.path.isfile(weights_file):
            raise WeightsError(f"model.weights_file: no file {weights_file!r}; on a connected machine "
                               f"`{fetch_command(name)}` writes one")
        return
    _locate(name)


def _locate(name: str) -> tuple[str, str]:
    """("file", a cached path) or ("download", the source's address, which answers); WeightsError otherwise."""
    if name == "bninception":
        from trainer.bninception import WEIGHTS_URL
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS_URL))
        if os.path.isfile(cached):
            return "file", cached
        source, where = WEIGHTS_URL, WEIGHTS_URL
    else:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise WeightsError(f"model.pretrained: timm has no published weights for {name}; give "
                               f"model.weights_file or model.pretrained=false")
        if cfg.hf_hub_id:
            from huggingface_hub import try_to_load_from_cache
            repo = cfg.hf_hub_id.split("@")[0]
            for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin")):
                path = try_to_load_from_cache(repo, filename)
                if isinstance(path, str) and os.path.isfile(path):
                    return "file", path
        source = _hub_endpoint() if cfg.hf_hub_id else typing.cast(str, cfg.url)  # set: checked above
        where = urlparse(source).netloc or source
    why = "HF_HUB_OFFLINE is set" if _offline() else reachable(source)
    if why:
        raise _unreachable(name, where, why)
    return "download", source


def _bninception_state_dict():
    kind, where = _locate("bninception")
    if kind == "download":
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(where))
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(where, cached)
        where = cached
    return read_file(where, "model.pretrained"), where


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _timm_state_dict(name: str):
    kind, where = _locate(name)
    if kind == "file":
        return read_file(where, "model.pretrained"), where
    import timm
    net = timm.create_model(name, pretrained=True)  # timm downloads (and converts) them; cached for next time
    return net.state_dict(), f"{name} (timm, from {where})"


def _hub_endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


# ----------------------------------------------------------------------------- python -m trainer.weights


def fetch(name: str, out: str) -> Loaded:
    """Write the published weights of `name` to `out` (safetensors when it ends in .safetensors, else torch.save
    of a plain state dict), after checking that they load in full into the backbone `name` builds."""
    state, source = pretrained_state_dict(name)
    b = _backbone(name)
    loaded = load_exact(b.weights_target, state, backbone=name, classifier=b.classifier, filter_fn=b.filter_fn,
                        source=source, key="NAME")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    state = {k: v.contiguous() for k, v in state.items()}
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, tmp)
    else:
        torch.save(state, tmp)
    os.replace(tmp, out)
    return loaded


def _backbone(name: str):
    from trainer.backbones import check_backbone, new_backbone
    try:
        check_backbone(name)
    except ValueError as e:
        raise WeightsError(f"NAME: {e}") from None
    return new_backbone(name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="write a backbone's published ImageNet weights to a file (needs internet)")
    f.add_argument("name", metavar="NAME", help="bninception or a timm model name (with its .tag if wanted)")
    f.add_argument("--out", required=True, help="the file to write (.pth, or .safetensors)")
    c = sub.add_parser("check", help="check that a weights file loads in full into a backbone (offline)")
    c.add_argument("name", metavar="NAME")
    c.add_argument("file", metavar="FILE")
    args = p.parse_args(argv)
    global FETCHING
    FETCHING = True
    from trainer.errors import report
    try:
        if args.command == "fetch":
            loaded = fetch(args.name, args.out)
            print(f"wrote {args.out} ({loaded.describe()}); train with model.backbone={args.name.split('.')[0]} "
                  f"model.weights_file={args.out}")
        else:
            b = _backbone(args.name)
            print(load_exact(b.weights_target, args.file, backbone=args.name, classifier=b.classifier,
                             filter_fn=b.filter_fn, key="FILE").describe())
    except BaseException as e:  # noqa: BLE001 - one line for a user error, a traceback for a bug
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
