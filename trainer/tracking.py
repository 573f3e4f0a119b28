"""MLflow tracking of a training run: rank 0 logs, every other rank (and disabled tracking) does nothing.

    tracker = Tracker(cfg.tracking, run_dir, rank=rank, config=resolved_cfg, resume_run_id=None)
    tracker.log_metrics({"loss": 0.3, "lr/backbone": 1e-4}, step)
    tracker.log_evaluation(eval_result, step, epoch, image_lookup=shard_image_lookup(test_split_dir))
    tracker.log_proxy_stats(criterion, step)  # every rank (gathers counts of distributed criteria)
    tracker.log_dataset(read_manifest(split_dir), "train")   # an mlflow.data input: name, digest, counts
    tracker.set_description("**ProxyGML** on cub200 ...")    # the run description in the UI (markdown)
    tracker.log_model(model)
    tracker.close()

Where it logs: `cfg.tracking_uri` if set, else $MLFLOW_TRACKING_URI, else a SQLite file
`sqlite:///<parent of run_dir>/mlflow.db` (artifacts beside it in `mlartifacts/`).

Every MLflow call is made by one sender thread, in order: a step only queues its event (pictures and
tables are written to `<run_dir>/tracking/artifacts/` first). A failing, unreachable or hung server never
stops nor stalls training: the first failure warns once, later events are appended to
`<run_dir>/tracking/pending.jsonl`, the server is retried every RETRY_INTERVAL_S (a local SQLite store every
LOCAL_RETRY_INTERVAL_S: busy, not down) and, once it answers, gets
what is pending. Tracker() waits at most START_WAIT_S for the run id, close() at most CLOSE_WAIT_S for the
queue. Whatever is still pending at the end is uploaded with

    python -m trainer.tracking upload RUN_DIR [--tracking-uri URI]

HTTP timeouts are kept short (MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES / _BACKOFF_FACTOR default to
10 s / 2 / 1 unless set in the environment).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import queue
import re
import subprocess
import tarfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TRACKING_DIR = "tracking"  # under the run directory: state.json, pending.jsonl, artifacts/, model/
RETRY_INTERVAL_S = 60.0  # while offline, ask the server again at most this often
LOCAL_RETRY_INTERVAL_S = 2.0  # the same for a local store (SQLite file): busy for a moment, not down
STORE_LOCK_WAIT_S = 120.0  # creating or upgrading a SQLite store waits at most this long for another process
START_WAIT_S = 30.0  # Tracker() waits at most this long for the first answer of the store (run id)
CLOSE_WAIT_S = 30.0  # close() waits at most this long for the sender thread to deliver what is queued
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
MAX_PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000
WORST_CLASSES = 25  # rows of worst_classes.csv (and the first 10 in the run's `eval.worst_classes` tag)
GRID_NEIGHBOURS = 8
STEP_DIR = "step-{:09d}"  # artifact folders per step, padded as the checkpoints (checkpoints/step-000000028.pt)
DESCRIPTION_TAG = "mlflow.note.content"  # the run description the MLflow UI shows (markdown)
PACKAGES = ("torch", "torchvision", "deepspeed", "webdataset", "mlflow", "omegaconf", "timm",
            "faiss-cpu", "numpy", "pillow", "scikit-learn")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers (pure)


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI (None for any other store)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def is_local_store(uri: str) -> bool:
    """A store this process opens itself (SQLite, file): retried within seconds, not a minute."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def resolve_tracking_uri(cfg_uri: str | None, run_dir: str | os.PathLike) -> str:
    """Config key first, then $MLFLOW_TRACKING_URI, then the SQLite file beside the run directory."""
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir)


def metric_key(name: str) -> str:
    """An MLflow-legal key: `recall@1` -> `recall_at_1`; other illegal characters become `_`."""
    return re.sub(r"[^\w./\- :]", "_", str(name).replace("@", "_at_"))


def _to_container(config: Any) -> dict:
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

    walk("", _to_container(config))
    return out


def _scalar(name: str, value: Any) -> float:
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
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit[0]
        tags["sys.git_dirty"] = str(commit[1])
    return tags


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def gpu_memory_metrics() -> dict[str, float]:
    """Peak / current GPU memory of this process in GiB (empty without CUDA)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    gib = 2.0**30
    return {"gpu/mem_allocated_gib": torch.cuda.memory_allocated() / gib,
            "gpu/mem_peak_gib": torch.cuda.max_memory_allocated() / gib,
            "gpu/mem_reserved_gib": torch.cuda.memory_reserved() / gib}


# ----------------------------------------------------------------------------- statistics


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


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 = all equal, -> 1 = all in one."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def proxy_statistics(counts: np.ndarray, proxies: np.ndarray, proxies_per_class: int):
    """Summaries (dict of metrics), a per-proxy and a per-class table of the proxy selection and spread.

    counts (C*N,) subgraph selections per proxy; proxies (C*N, dim), class-major (proxy j is class j // N).
    Spread of a class = mean pairwise cosine distance between its N proxies (0 when N = 1).
    """
    import pandas as pd

    counts = np.asarray(counts, dtype=np.int64)
    n = int(proxies_per_class)
    if n < 1 or len(counts) % n or proxies.shape[0] != len(counts):
        raise ValueError(f"proxy stats: {len(counts)} counts, {proxies.shape[0]} proxies, "
                         f"proxies_per_class={n} do not fit together")
    c = len(counts) // n
    total = int(counts.sum())
    p = counts / total if total else np.zeros(len(counts))
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum() / math.log(len(counts))) if len(counts) > 1 and total else 0.0
    unit = proxies / np.maximum(np.linalg.norm(proxies, axis=1, keepdims=True), 1e-12)
    by_class = unit.reshape(c, n, -1)
    if n > 1:
        cos = np.einsum("cid,cjd->cij", by_class, by_class)
        spread = 1.0 - (cos.sum(axis=(1, 2)) - n) / (n * (n - 1))
    else:
        spread = np.zeros(c)
    class_counts = counts.reshape(c, n).sum(axis=1)
    summary = {
        "proxy/never_selected_share": float((counts == 0).mean()),
        "proxy/class_never_selected_share": float((class_counts == 0).mean()),
        "proxy/selection_gini": gini(counts),
        "proxy/selection_entropy": entropy,
        "proxy/selections": float(total),
        "proxy/class_spread_mean": float(spread.mean()),
        "proxy/norm_mean": float(np.linalg.norm(proxies, axis=1).mean()),
    }
    per_proxy = pd.DataFrame({"proxy": np.arange(len(counts)), "class": np.arange(len(counts)) // n,
                              "selection_count": counts, "norm": np.linalg.norm(proxies, axis=1)})
    per_class = pd.DataFrame({"class": np.arange(c), "selection_count": class_counts,
                              "proxies_selected": (counts.reshape(c, n) > 0).sum(axis=1), "spread": spread})
    return summary, per_proxy, per_class


def _proxies_per_class(criterion, total: int) -> int:
    for name in ("proxies_per_class", "N", "num_proxies_per_class"):
        value = getattr(criterion, name, None)
        if isinstance(value, int) and value > 0:
            return value
    classes = getattr(criterion, "num_classes", None) or getattr(criterion, "C", None)
    if isinstance(classes, int) and classes > 0 and total % classes == 0:
        return total // classes
    return 1


# ----------------------------------------------------------------------------- retrieval pictures


def pick_queries(keys, labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """A fixed set of n query indices spread over as many classes as possible: the classes in a seeded order,
    taken round-robin, each giving its samples in key order (the same for the same evaluation set)."""
    labels = np.asarray(labels)
    order = np.argsort(np.asarray([str(k) for k in keys]), kind="stable")
    classes = np.random.default_rng(seed).permutation(np.unique(labels))
    per_class = {c: [i for i in order if labels[i] == c] for c in classes}
    picks: list[int] = []
    for depth in range(max((len(v) for v in per_class.values()), default=0)):
        picks += [per_class[c][depth] for c in classes if depth < len(per_class[c])]
        if len(picks) >= n:
            break
    return np.asarray(picks[:n], dtype=np.int64)


def nearest_neighbours(embeddings, query_idx: np.ndarray, k: int = GRID_NEIGHBOURS) -> np.ndarray:
    """Indices of the k most similar samples (cosine, as trainer.metrics ranks them) of each query, the query
    itself excluded."""
    import torch

    emb = torch.as_tensor(np.asarray(embeddings) if not torch.is_tensor(embeddings) else embeddings)
    emb = torch.nn.functional.normalize(emb.detach().float().cpu(), dim=1)
    q = torch.as_tensor(query_idx)
    sims = emb[q] @ emb.T
    sims[torch.arange(len(q)), q] = -float("inf")
    return sims.topk(min(k, emb.shape[0] - 1), dim=1).indices.numpy()


_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key/extension split of a member name
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")


def shard_image_lookup(split_dir: str | os.PathLike) -> Callable[[Iterable[str]], dict]:
    """A lookup `keys -> {key: PIL.Image}` over the webdataset tar shards of a split directory.

    The first call indexes the shards (tar headers and the small json members; image data is skipped by
    seeking), later calls read just the requested images. Keys: the tar key (`__key__`) or the original path
    kept in the sample's json, which is what `eval_loader` yields as keys. Shards: those of the split's
    manifest.json (else every *.tar there); the first image extension of a sample (jpg, png, ...) is taken.
    """
    split = Path(split_dir)
    index: dict[str, tuple[Path, tarfile.TarInfo]] = {}

    def build() -> None:  # on first use: a remote split fails there (the tracker warns), not at construction
        if not split.is_dir():
            raise FileNotFoundError(f"shard_image_lookup: split_dir {str(split)!r} is not a local directory")
        if (split / "manifest.json").exists():
            from data_shards import read_manifest

            shards = [Path(s) for s in read_manifest(str(split)).shards]
        else:
            shards = sorted(split.glob("*.tar"))
        missing = [str(s) for s in shards if not s.is_file()]
        if not shards or missing:
            raise FileNotFoundError(f"shard_image_lookup: split_dir {str(split)!r} has no local tar shards"
                                    + (f" (missing: {missing[:3]})" if missing else ""))
        for shard in shards:
            with tarfile.open(shard) as tar:
                metas = []
                for member in tar:
                    m = _WDS_KEY.match(member.name)
                    if not (member.isfile() and m):
                        continue
                    ext = m.group(2).lower()
                    if ext.split(".")[-1] in IMAGE_EXTS:
                        index.setdefault(m.group(1), (shard, member))
                    elif ext == "json":
                        metas.append((m.group(1), member))
                for key, member in metas:  # the eval stream's keys are the original paths kept in the json
                    if key in index:
                        with tar.extractfile(member) as f:
                            path = json.load(f).get("path")
                        if path:
                            index.setdefault(str(path), index[key])

    def lookup(keys: Iterable[str]) -> dict:
        from PIL import Image

        if not index:
            build()
        by_shard: dict[Path, list[tuple[str, tarfile.TarInfo]]] = {}
        for key in keys:
            if key in index:
                shard, member = index[key]
                by_shard.setdefault(shard, []).append((key, member))
        images = {}
        for shard, members in by_shard.items():
            with tarfile.open(shard) as tar:
                for key, member in members:
                    with tar.extractfile(member) as f:
                        image = Image.open(f)
                        image.load()
                    images[key] = image
        return images

    return lookup


# ----------------------------------------------------------------------------- the store


class _Store:
    """MLflow calls for one tracking URI; applies the tracker's events (also used by the upload CLI)."""

    def __init__(self, uri: str, artifact_root: str | None = None):
        from mlflow import MlflowClient

        self.uri = uri
        self.artifact_root = artifact_root
        db = sqlite_path(uri)
        if db is None:
            self.client = MlflowClient(tracking_uri=uri)
            return
        # Opening a SQLite store creates or upgrades its schema; runs starting together on a new store race
        # there ("duplicate column name"). One process at a time does it, under a lock file beside the store.
        from filelock import FileLock

        db.parent.mkdir(parents=True, exist_ok=True)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial ... tables"
        with FileLock(f"{db}.lock", timeout=STORE_LOCK_WAIT_S):
            self.client = MlflowClient(tracking_uri=uri)
            self.client.search_experiments(max_results=1)  # the store is ready before the lock is let go

    def ensure_run(self, experiment: str, run_name: str, run_id: str | None, reopen: bool = True) -> str:
        """The id of run `run_id` (set RUNNING again if `reopen`), or of a new run when it is None or unknown."""
        from mlflow.exceptions import MlflowException

        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as e:
                if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise
                warnings.warn(f"Tracker: MLflow run {run_id} does not exist at {self.uri}; starting a new run",
                              RuntimeWarning, stacklevel=3)
            else:
                if reopen and run.info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
                return run_id
        return self.client.create_run(self._experiment_id(experiment), run_name=run_name or None).info.run_id

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = f"{Path(self.artifact_root).as_uri()}/{name}" if self.artifact_root else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def apply(self, run_id: str, event: dict) -> None:
        op = event["op"]
        if op == "params":
            self._log_params(run_id, event["params"])
        elif op == "tags":
            from mlflow.entities import RunTag

            tags = [RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in event["tags"].items()]
            for i in range(0, len(tags), MAX_PARAMS_PER_BATCH):
                self.client.log_batch(run_id, tags=tags[i : i + MAX_PARAMS_PER_BATCH])
        elif op == "metrics":
            from mlflow.entities import Metric

            ts, step = int(event["timestamp"]), int(event["step"])
            metrics = [Metric(k, float(v), ts, step) for k, v in event["metrics"].items()]
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
        elif op == "artifacts":
            self.client.log_artifacts(run_id, event["local"], event.get("artifact_path"))
        elif op == "dataset":
            from mlflow.entities import DatasetInput, InputTag

            dataset = shard_dataset(event["location"], event["name"], event["digest"], event["profile"])
            self.client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                         [InputTag("mlflow.data.context", event["context"])])])
        elif op == "model":
            import mlflow.pytorch

            model = mlflow.pytorch.load_model(event["local"], map_location="cpu")
            self.log_model(run_id, model)
        elif op == "end":
            self.client.set_terminated(run_id, event["status"], int(event["timestamp"]))
        else:
            raise ValueError(f"unknown tracking event op {op!r}")

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """New keys become params (batches of 100); a key logged before with another value (a resumed run
        with a changed config) cannot change in MLflow and goes to a `param_changed.<key>` tag instead."""
        from mlflow.entities import Param, RunTag

        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        changed = [RunTag(f"param_changed.{k}", v[:MAX_TAG_VALUE]) for k, v in params.items()
                   if k in existing and existing[k] != v]
        for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=new[i : i + MAX_PARAMS_PER_BATCH])
        for i in range(0, len(changed), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=changed[i : i + MAX_PARAMS_PER_BATCH])

    def log_model(self, run_id: str, model) -> None:
        import mlflow.pytorch

        # mlflow.pytorch logs through the global client, and creates the LoggedModel in the active experiment
        with mlflow_globals(self.uri, self.client.get_run(run_id).info.experiment_id):
            info = mlflow.pytorch.log_model(model, name="model", run_id=run_id, **_model_options())
        self.client.set_tag(run_id, "model_uri", info.model_uri)

    def replay(self, run_id: str, pending: Path) -> int:
        """Apply the events of a pending file in order; the file keeps only those not yet applied."""
        if not pending.exists():
            return 0
        events = [json.loads(line) for line in pending.read_text().splitlines() if line.strip()]
        done = 0
        try:
            for event in events:
                self.apply(run_id, event)
                done += 1
        finally:
            rest = events[done:]
            if rest:
                pending.write_text("".join(json.dumps(e) + "\n" for e in rest))
            else:
                pending.unlink()
        return done


def _dataset_source(location: str):
    """An mlflow.data source for a split location: the first registered source type that takes it (a local
    folder, an http(s) URL; mlflow's own resolver warns when two registered types match), else a code source
    carrying the location (a `pipe:` command)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import get_registered_sources

    for source in get_registered_sources():
        with contextlib.suppress(Exception):
            if source._can_resolve(location):
                return source._resolve(location)
    return CodeDatasetSource({"location": location})


def shard_dataset(location: str, name: str, digest: str, profile: dict):
    """An mlflow.data MetaDataset of a shard split whose profile holds its counts (mlflow imported on use)."""
    from mlflow.data.meta_dataset import MetaDataset

    class ShardDataset(MetaDataset):
        @property
        def profile(self) -> dict:
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    return ShardDataset(_dataset_source(location), name=name, digest=digest)


@contextlib.contextmanager
def mlflow_globals(uri: str, experiment_id: str | None = None):
    """MLflow's global tracking URI (and active experiment) set for a block, then put back.

    mlflow.set_tracking_uri / set_experiment also export MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID to the
    environment, which would redirect every later Tracker of the process (and its child processes): the
    environment and both globals are restored on exit. Also for loading: `with mlflow_globals(uri):
    mlflow.pytorch.load_model(f"runs:/{run_id}/model")`."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as service

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    saved_uri, saved_experiment = service._tracking_uri, fluent._active_experiment_id
    try:
        mlflow.set_tracking_uri(uri)
        if experiment_id is not None:
            mlflow.set_experiment(experiment_id=experiment_id)
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        fluent._active_experiment_id = saved_experiment
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _QuietPickleWarning(logging.Filter):
    """mlflow.pytorch warns on every pickled model; the tracker chose pickle on purpose (see _model_options)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()


logging.getLogger("mlflow.pytorch").addFilter(_QuietPickleWarning())


def _model_options() -> dict:
    """mlflow.pytorch options: the pickled nn.Module (mlflow 3.17's default 'pt2' needs an input example
    and loads back as an exported graph), pinned requirements instead of a slow inference subprocess."""
    return {"serialization_format": "pickle", "pip_requirements": _pip_requirements()}


def _pip_requirements() -> list[str]:
    reqs = []
    for pkg in ("torch", "torchvision", "timm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            reqs.append(f"{pkg}=={importlib.metadata.version(pkg)}")
    return reqs


# ----------------------------------------------------------------------------- the tracker


class Tracker:
    """Logs a training run to MLflow from rank 0; a no-op on other ranks and when `cfg.enabled` is false.

    cfg: any object with enabled, tracking_uri, experiment, run_name, log_every_steps,
    retrieval_grid_queries (trainer.config.TrackingConfig). config: the resolved run config (DictConfig
    or dict), logged flattened as params and as config.yaml. resume_run_id: continue that MLflow run.
    """

    def __init__(self, cfg, run_dir, *, rank: int = 0, config: Any = None, resume_run_id: str | None = None,
                 world_size: int | None = None):
        self.cfg = cfg
        self.active = bool(cfg.enabled) and rank == 0
        self._run_id: str | None = None
        self._eval_history: list[tuple[int, dict[int, float]]] = []
        self._closed = False
        self._abandoned = False
        if not self.active:
            return
        container = _to_container(config)  # bad config type: an error before anything is created
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / TRACKING_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending = self.dir / "pending.jsonl"
        self.uri = resolve_tracking_uri(getattr(cfg, "tracking_uri", ""), run_dir)
        default_store = self.uri == default_tracking_uri(run_dir)
        artifact_root = str(self.run_dir.resolve().parent / "mlartifacts") if default_store else None
        self.experiment = cfg.experiment or "proxygml"
        self.run_name = cfg.run_name or self.run_dir.name
        state = self._read_state()
        self._run_id = resume_run_id or (state.get("run_id") if self.pending.exists() else None)
        if self._run_id and state.get("run_id") == self._run_id:  # same run: the recall curve goes on
            self._eval_history = [(int(s), {int(k): v for k, v in r.items()}) for s, r in state.get("eval_history", [])]
        self._artifact_root = artifact_root
        self._store: _Store | None = None
        self._online = False
        self._warned = False
        self._last_try = -math.inf
        self._local = is_local_store(self.uri)
        self._lock = threading.Lock()  # pending.jsonl and state.json are written by both threads
        self._write_state(artifact_root)
        # every MLflow call happens in one sender thread: a slow or hung server never blocks a step
        self._queue: queue.Queue = queue.Queue()
        self._started = threading.Event()
        self._worker = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._worker.start()
        self._started.wait(START_WAIT_S)  # the run id, when the store answers in time

        self._emit({"op": "tags", "tags": system_facts(world_size or _world_size())})
        if container:
            self._emit({"op": "params", "params": flatten_config(container)})
            self._log_config_yaml(container)

    # -- public API

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """One batch of scalar metrics at `step` (tensors and numpy scalars welcome); GPU memory added."""
        if not self.active:
            return
        values = {metric_key(k): _scalar(k, v) for k, v in metrics.items()}
        values.update(gpu_memory_metrics())
        self._emit({"op": "metrics", "step": int(step), "timestamp": _now_ms(), "metrics": values})

    def log_evaluation(self, result, step: int, epoch: int | None = None,
                       image_lookup: Callable[[list[str]], Mapping[str, Any]] | None = None) -> None:
        """All metrics of an EvalResult (as `eval/<name>`), the per-class table with its summaries, the
        worst classes, a histogram of per-class recall, the recall curve and the retrieval grid."""
        if not self.active or result is None or result.metrics is None:
            return
        from trainer import plots

        metrics, texts = {}, {}
        for k, v in result.metrics.items():
            try:
                metrics[f"eval/{metric_key(k)}"] = _scalar(k, v)
            except ValueError:  # not a number: kept as a tag rather than dropped
                texts[f"eval.{metric_key(k)}"] = str(v)
        if epoch is not None:
            metrics["epoch"] = float(epoch)
        out = self._artifact_dir(f"evaluations/{STEP_DIR.format(int(step))}")
        per_class = getattr(result, "per_class", None)
        if per_class is not None and len(per_class):
            metrics.update({f"eval/{k}": v for k, v in per_class_summary(per_class).items()})
            write_csv(per_class, out / "per_class_recall.csv")
            worst = worst_classes(per_class)
            write_csv(worst, out / "worst_classes.csv")
            texts["eval.worst_classes"] = _worst_text(worst.head(10))
            self._picture(plots.recall_histogram, per_class["recall_at_1"].to_numpy(dtype=float),
                          str(out / "per_class_recall_hist.png"), title=f"per-class Recall@1, step {step}")
        recalls = _recall_at_k(result.metrics)
        if recalls:
            self._eval_history.append((int(step), recalls))
            self._write_state()
            self._picture(plots.recall_curve, self._eval_history, str(out / "recall_curve.png"))
        n_rows = int(getattr(self.cfg, "retrieval_grid_queries", 0) or 0)
        if image_lookup is not None and n_rows > 0:
            title = f"retrieval at step {int(step)}" + (f", epoch {epoch}" if epoch is not None else "")
            self._picture(self._retrieval_grid, result, image_lookup, n_rows, str(out / "retrieval_grid.png"),
                          title)
        self._emit({"op": "metrics", "step": int(step), "timestamp": _now_ms(), "metrics": metrics})
        if texts:
            self._emit({"op": "tags", "tags": texts})
        self._emit({"op": "artifacts", "local": str(out), "artifact_path": out.relative_to(self._artifacts)
                    .as_posix()})

    def set_description(self, text: str) -> None:
        """The run's description in the MLflow UI (markdown; the `mlflow.note.content` tag), replaced on each
        call: e.g. dataset, backbone, loss, world size and the latest Recall@1."""
        if self.active:
            self._emit({"op": "tags", "tags": {DESCRIPTION_TAG: str(text)}})

    def log_dataset(self, manifest, context: str) -> None:
        """A shard split as an MLflow dataset input of the run (mlflow.data): name `<dataset>/<split>`, a digest
        of its shards' sha256, its location as source, and its counts (samples, classes, shards) as profile.

        manifest: data_shards.Manifest; context: "train" or "test" (the input's `mlflow.data.context` tag)."""
        if not self.active:
            return
        digest = hashlib.sha256("".join(manifest.shard_sha256).encode()).hexdigest()[:8]
        profile = {"samples": int(manifest.num_samples), "classes": int(manifest.num_classes),
                   "shards": len(manifest.shard_names), "skipped": int((manifest.skipped or {}).get("count", 0))}
        self._emit({"op": "dataset", "name": f"{manifest.dataset}/{manifest.split}", "digest": digest,
                    "location": str(manifest.location), "profile": profile, "context": context})

    def log_proxy_stats(self, criterion, step: int) -> None:
        """Summaries of the proxies' subgraph selections since the last call (metrics `proxy/*`), the full
        per-proxy and per-class vectors as CSV artifacts; then resets the criterion's counts. Nothing is logged
        when no proxy was selected since the last call (e.g. an evaluation before training).

        Call on every rank: with the distributed criteria of loss.distributed each rank summarises its own block
        of proxies and the parts are reduced (loss/proxy_stats.py: collectives; the proxy table is never gathered).
        A criterion without subgraphs (the pytorch-metric-learning baselines) has nothing to log."""
        if not hasattr(criterion, "selection_counts"):
            return
        if getattr(self.cfg, "enabled", False):
            from loss.proxy_stats import reduced_proxy_statistics
            stats = reduced_proxy_statistics(criterion)  # None: nothing selected since the last call
            if self.active and stats is not None:
                self._log_proxy_stats(*stats, step)
        criterion.reset_selection_counts()

    def _log_proxy_stats(self, summary: dict, per_proxy, per_class, step: int) -> None:
        out = self._artifact_dir(f"proxies/{STEP_DIR.format(int(step))}")
        write_csv(per_proxy, out / "proxy_selection.csv")
        write_csv(per_class, out / "class_proxy_stats.csv")
        self._emit({"op": "metrics", "step": int(step), "timestamp": _now_ms(), "metrics": summary})
        self._emit({"op": "artifacts", "local": str(out), "artifact_path": out.relative_to(self._artifacts)
                    .as_posix()})

    def log_model(self, model) -> None:
        """The embedding model (DDP/DeepSpeed/torch.compile wrappers removed, a CPU copy) with mlflow.pytorch
        as `model` of the run: `mlflow.pytorch.load_model("runs:/<run_id>/model")` (or the run's `model_uri`
        tag) loads it back where this project is importable. Offline, it is saved under tracking/model and
        uploaded later. A model that cannot be serialised is reported with a warning, never fatal."""
        if not self.active:
            return
        while hasattr(model, "module") or hasattr(model, "_orig_mod"):
            model = getattr(model, "module", None) or model._orig_mod
        try:
            cpu_model = copy.deepcopy(model).cpu().eval()
        except Exception as e:
            warnings.warn(f"Tracker.log_model: the model could not be copied: {e!r}", RuntimeWarning, stacklevel=2)
            return
        self._emit({"op": "model_object", "model": cpu_model})

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run (FINISHED | FAILED | KILLED); says how to upload what could not be sent."""
        if not self.active or self._closed:
            return
        self._closed = True
        self._emit({"op": "end", "status": status, "timestamp": _now_ms()})
        self._queue.put(None)
        self._worker.join(CLOSE_WAIT_S)
        if self._worker.is_alive():  # stuck in a call to a hung server: keep the rest locally
            self._abandoned = True
            warnings.warn(f"Tracker: MLflow at {self.uri} did not answer within {CLOSE_WAIT_S:.0f} s; the events "
                          "not sent yet are kept locally", RuntimeWarning, stacklevel=2)
            while True:
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    break
                if event is not None:
                    self._keep(event)
        if self.pending.exists():
            warnings.warn(f"Tracker: tracking server unreachable, events kept in {self.pending}; upload them "
                          f"with: python -m trainer.tracking upload {self.run_dir}", RuntimeWarning, stacklevel=2)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close("FAILED" if exc_type else "FINISHED")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event logged so far is delivered (or kept locally); False on timeout."""
        if not self.active:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (None off rank 0, when disabled, or while the store has not answered yet: then
        this waits up to START_WAIT_S for the sender thread's first connection attempt)."""
        if self.active and not self._started.is_set():
            self._started.wait(START_WAIT_S)
        return self._run_id

    @property
    def online(self) -> bool:
        """Whether the last call to the store worked (events may still be queued: see flush)."""
        return self.active and self._online

    # -- internals

    @property
    def _artifacts(self) -> Path:
        return self.dir / "artifacts"

    def _artifact_dir(self, rel: str) -> Path:
        path = self._artifacts / rel
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _log_config_yaml(self, container: dict) -> None:
        from omegaconf import OmegaConf

        out = self._artifact_dir("config")
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(container)))
        self._emit({"op": "artifacts", "local": str(out), "artifact_path": None})

    def _retrieval_grid(self, result, image_lookup, n_rows: int, path: str, title: str) -> None:
        from trainer import plots

        keys = [str(k) for k in result.keys]
        labels = np.asarray(result.labels.cpu() if hasattr(result.labels, "cpu") else result.labels)
        queries = pick_queries(keys, labels, n_rows)
        neighbours = nearest_neighbours(result.embeddings, queries)
        rows = [{"key": keys[q], "label": int(labels[q]),
                 "neighbours": [(keys[j], int(labels[j])) for j in nb]} for q, nb in zip(queries, neighbours)]
        wanted = sorted({keys[q] for q in queries} | {keys[j] for nb in neighbours for j in nb})
        images = image_lookup(wanted)
        missing = [k for k in wanted if k not in images]
        if missing:
            log.warning("retrieval grid: %d of %d images not found (e.g. %r)", len(missing), len(wanted),
                        missing[0])
        per_class, names = getattr(result, "per_class", None), None
        if per_class is not None and {"class_index", "class_name"} <= set(per_class.columns):
            names = dict(zip(per_class["class_index"].astype(int), per_class["class_name"].astype(str)))
        plots.retrieval_grid(rows, images, path, names=names, title=title)

    def _picture(self, fn, *args, **kwargs) -> None:
        """A picture that fails to draw is reported, never fatal to training."""
        try:
            fn(*args, **kwargs)
        except Exception as e:
            warnings.warn(f"Tracker: could not draw {fn.__name__}: {e!r}", RuntimeWarning, stacklevel=3)

    def _connect(self) -> bool:
        self._last_try = time.monotonic()
        try:
            if self._store is None:  # creating the client already touches a SQLite store
                self._store = _Store(self.uri, self._artifact_root)
            self._run_id = self._store.ensure_run(self.experiment, self.run_name, self._run_id)
            self._write_state()
            self._store.replay(self._run_id, self.pending)
        except Exception as e:
            self._fail(e)
            return False
        if not self._online and self._warned:
            log.warning("Tracker: tracking server %s reachable again; pending events uploaded", self.uri)
        self._online = True
        return True

    @property
    def _retry_s(self) -> float:
        return LOCAL_RETRY_INTERVAL_S if self._local else RETRY_INTERVAL_S

    def _reconnect_due(self) -> bool:
        if time.monotonic() - self._last_try < self._retry_s:
            return False
        return self._connect()

    def _fail(self, error: Exception) -> None:
        self._online = False
        self._last_try = time.monotonic()
        if not self._warned:
            self._warned = True
            warnings.warn(f"Tracker: MLflow at {self.uri} failed ({type(error).__name__}: {error}); training "
                          f"goes on, events are kept in {self.pending} and retried every {self._retry_s:.0f}"
                          f" s (or: python -m trainer.tracking upload {self.run_dir})", RuntimeWarning,
                          stacklevel=4)
        else:
            log.debug("Tracker: MLflow still failing: %r", error)

    def _emit(self, event: dict) -> None:
        self._queue.put(event)

    def _work(self) -> None:
        """The sender thread: connects, then delivers events in order until close() sends None."""
        try:
            self._connect()
        finally:
            self._started.set()
        while True:
            event = self._queue.get()
            try:
                if event is None:  # close(): a last try for what is pending, whatever the retry interval
                    if not self._online and not self._abandoned and self.pending.exists():
                        self._connect()
                    return
                if self._abandoned:  # close() gave up waiting: no more calls to the store
                    self._keep(event)
                else:
                    self._deliver(event)
            except Exception as e:  # the thread must live on: the event is kept, the error reported
                log.exception("Tracker: event %s could not be delivered nor kept: %r", event.get("op"), e)
            finally:
                self._queue.task_done()

    def _deliver(self, event: dict) -> None:
        if self._online or self._reconnect_due():
            try:
                if event["op"] == "model_object":
                    self._store.log_model(self._run_id, event["model"])
                else:
                    self._store.apply(self._run_id, event)
                return
            except Exception as e:
                self._fail(e)
        self._keep(event)

    def _keep(self, event: dict) -> None:
        """Append an event to pending.jsonl (a model object is saved under tracking/model first)."""
        if event["op"] == "model_object":
            import shutil

            import mlflow.pytorch

            local = self.dir / "model"
            if local.exists():
                shutil.rmtree(local)
            try:
                mlflow.pytorch.save_model(event["model"], str(local), **_model_options())
            except Exception as e:
                warnings.warn(f"Tracker.log_model: the model could not be saved: {e!r}", RuntimeWarning,
                              stacklevel=2)
                return
            event = {"op": "model", "local": str(local)}
        with self._lock, self.pending.open("a") as f:
            f.write(json.dumps(event) + "\n")

    def _read_state(self) -> dict:
        path = self.dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _write_state(self, artifact_root: str | None = None) -> None:
        with self._lock:
            state = self._read_state()
            state.update({"tracking_uri": self.uri, "experiment": self.experiment, "run_name": self.run_name,
                          "run_id": self._run_id, "eval_history": self._eval_history})
            if artifact_root is not None:
                state["artifact_root"] = artifact_root
            tmp = self.dir / "state.json.tmp"
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(self.dir / "state.json")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _recall_at_k(metrics: Mapping[str, Any]) -> dict[int, float]:
    """{K: Recall@K} from metric names like recall@1, recall_at_1, R@1, r_at_1."""
    out = {}
    for name, value in metrics.items():
        m = re.fullmatch(r"(?:recall|r)(?:@|_at_|_?@k=?)(\d+)", str(name), flags=re.IGNORECASE)
        if m:
            out[int(m.group(1))] = _scalar(name, value)
    return out


def _worst_text(worst) -> str:
    """`name (R@1 0.00, n=12); ...` from the per-class table (class_name/name, size columns if present)."""
    name_col = next((c for c in ("class_name", "name", "class_index", "class") if c in worst.columns), None)
    names = worst[name_col] if name_col else worst.index
    sizes = worst["size"] if "size" in worst.columns else [None] * len(worst)
    return "; ".join(f"{n} (R@1 {r:.2f}" + (f", n={int(s)})" if s is not None else ")")
                     for n, r, s in zip(names, worst["recall_at_1"], sizes))


# ----------------------------------------------------------------------------- CLI


def upload(run_dir: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """Send a run directory's pending events (written while the server was down); returns the run id."""
    tdir = Path(run_dir) / TRACKING_DIR
    state_path = tdir / "state.json"
    if not state_path.exists():
        raise FileNotFoundError(f"upload: {state_path} not found: {run_dir!r} is not a tracked run directory")
    state = json.loads(state_path.read_text())
    uri = tracking_uri or state["tracking_uri"]
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    store = _Store(uri, state.get("artifact_root"))
    run_id = store.ensure_run(state["experiment"], state["run_name"], state.get("run_id"), reopen=False)
    n = store.replay(run_id, tdir / "pending.jsonl")
    state.update({"run_id": run_id, "tracking_uri": uri})
    state_path.write_text(json.dumps(state, indent=1))
    print(f"uploaded {n} pending events of {run_dir} to run {run_id} at {uri}")
    return run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.tracking", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="send the events a run kept locally while MLflow was unreachable")
    up.add_argument("run_dir")
    up.add_argument("--tracking-uri", default=None, help="default: the URI the run used (tracking/state.json)")
    args = parser.parse_args(argv)
    if args.command == "upload":
        upload(args.run_dir, args.tracking_uri)


if __name__ == "__main__":
    main()
