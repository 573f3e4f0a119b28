"""Pure functions the tracker logs with: metric keys, the flattened config, system facts, per-class summaries,
the worst classes, Gini coefficient and the reference proxy statistics (numpy), CSV tables."""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trainer.redact import redact

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
WORST_CLASSES = 25  # rows of worst_classes.csv (and the first 10 in the run's `eval.worst_classes` tag)
PACKAGES = ("torch", "torchvision", "deepspeed", "webdataset", "mlflow", "omegaconf", "timm",
            "faiss-cpu", "numpy", "pillow", "scikit-learn")
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


def metric_key(name: str) -> str:
    """An MLflow-legal key: `recall@1` -> `recall_at_1`; other illegal characters become `_`."""
    return re.sub(r"[^\w./\- :]", "_", str(name).replace("@", "_at_"))


def to_container(config: Any) -> dict:
    if config is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"Tracker: `config` must be an omegaconf DictConfig or a dict, got {type(config).__name__}")


def flatten_config(config: Any) -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}; lists as JSON; values cut to MLflow's 6,000 characters."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        value = json.dumps(node) if isinstance(node, (list, tuple, Mapping)) else str(node)
        if len(value) > MAX_PARAM_VALUE:
            value = value[: MAX_PARAM_VALUE - 3] + "..."
        out[metric_key(prefix)[:250]] = value

    walk("", to_container(config))
    return out


def scalar(name: str, value: Any) -> float:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Tracker.log_metrics: metric {name!r} must be a number, got {type(value).__name__}")
    return float(value)


def git_commit(root: Path = PROJECT_ROOT) -> tuple[str, bool] | None:
    """(commit, dirty) of the project checkout, or None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return head, bool(status.strip())


def run_command(argv: list[str] | None = None) -> str:
    """The command line that started this process, as a user would type it (`python -m trainer ...`), with every
    credential in it masked (trainer/redact.py: a password in a tracking URI or a data URL never reaches MLflow)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(os.path.join("trainer", "__main__.py")):  # python -m trainer (or torchrun -m)
        argv = ["python", "-m", "trainer", *argv[1:]]
    return redact(shlex.join(argv))


def source_tags(argv: list[str] | None = None) -> dict[str, str]:
    """MLflow's run source: the command line, the UI's "Source" (the git commit is tagged beside it). Type JOB:
    the UI shows a JOB's source name whole, a LOCAL one only after its last "/" (a script's file name)."""
    return {"mlflow.source.name": run_command(argv), "mlflow.source.type": "JOB"}


def system_facts(world_size: int) -> dict[str, str]:
    """Tags describing where the run ran: world size, GPU, package versions, git commit."""
    import torch

    tags = {"sys.world_size": str(world_size), "sys.python": platform.python_version(),
            "sys.hostname": platform.node()}
    if torch.cuda.is_available():
        tags["sys.gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        tags["sys.cuda"] = str(torch.version.cuda)
    else:
        tags["sys.gpu"] = "none (cpu)"
    for pkg in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            tags[f"sys.pkg.{pkg}"] = importlib.metadata.version(pkg)
    tags.update(source_tags())
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit[0]
        tags["sys.git_dirty"] = str(commit[1])
    return tags


def gpu_memory_metrics() -> dict[str, float]:
    """Peak / current GPU memory of this process in GiB (empty without CUDA)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    gib = 2.0**30
    return {"gpu/mem_allocated_gib": torch.cuda.memory_allocated() / gib,
            "gpu/mem_peak_gib": torch.cuda.max_memory_allocated() / gib,
            "gpu/mem_reserved_gib": torch.cuda.memory_reserved() / gib}


def per_class_summary(per_class, column: str = "recall_at_1") -> dict[str, float]:
    """Summaries of the per-class recall table, as a handful of metrics (never one key per class)."""
    if column not in per_class.columns:
        raise ValueError(f"per-class table: column {column!r} missing (has {list(per_class.columns)})")
    r = per_class[column].to_numpy(dtype=float)
    r = r[~np.isnan(r)]
    if not len(r):
        return {}
    return {"class_r1/mean": float(r.mean()), "class_r1/median": float(np.median(r)),
            "class_r1/p10": float(np.percentile(r, 10)), "class_r1/min": float(r.min()),
            "class_r1/zero_share": float((r == 0).mean())}  # the class count is constant: in the dataset input


def worst_classes(per_class, n: int = WORST_CLASSES, column: str = "recall_at_1"):
    """The n classes with the lowest recall (ties: larger classes first)."""
    sort_cols, asc = [column], [True]
    if "size" in per_class.columns:
        sort_cols.append("size")
        asc.append(False)
    return per_class.dropna(subset=[column]).sort_values(sort_cols, ascending=asc, kind="stable").head(n)


def write_csv(table, path) -> None:
    """A table as CSV for spreadsheets and the MLflow preview: one header row, no index column, UTF-8,
    numbers to 6 significant digits (not 17)."""
    table.to_csv(path, index=False, float_format="%.6g", encoding="utf-8")


def recall_at_k(metrics: Mapping[str, Any]) -> dict[int, float]:
    """{K: Recall@K} from metric names like recall@1, recall_at_1, R@1, r_at_1."""
    out = {}
    for name, value in metrics.items():
        m = re.fullmatch(r"(?:recall|r)(?:@|_at_|_?@k=?)(\d+)", str(name), flags=re.IGNORECASE)
        if m:
            out[int(m.group(1))] = scalar(name, value)
    return out


def worst_text(worst) -> str:
    """`name (R@1 0.00, n=12); ...` from the per-class table (class_name/name, size columns if present)."""
    name_col = next((c for c in ("class_name", "name", "class_index", "class") if c in worst.columns), None)
    names = worst[name_col] if name_col else worst.index
    sizes = worst["size"] if "size" in worst.columns else [None] * len(worst)
    return "; ".join(f"{n} (R@1 {r:.2f}" + (f", n={int(s)})" if s is not None else ")")
                     for n, r, s in zip(names, worst["recall_at_1"], sizes))
