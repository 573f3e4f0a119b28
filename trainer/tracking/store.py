"""The MLflow calls of the tracker, for one tracking URI: where runs are stored (URI rules), creating or reopening
a run, applying the tracker's events (params, tags, metrics, artifacts, dataset inputs, models); the dataset inputs
and model options; a model kept offline as data; MLflow's globals set for a block. The backend that the tracker
drives with them: trainer.tracking.mlflow_backend."""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from trainer.redact import redact, split_userinfo

STORE_LOCK_WAIT_S = 120.0  # creating a SQLite store waits at most this long for another process (then retried)
SQLITE_BUSY_TIMEOUT_MS = 60_000  # a SQLite connection waits this long for another writer before `database is locked`
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
MAX_PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_TAG_VALUE = 8000

# What the MLflow 3.17 UI shows first (checked in a browser; tests/trainer/tracking/test_tracking_ui.py reads the
# same through the API). Its experiment page follows the sidebar's GenAI / Model training switch, not the
# experiment: the link the trainer prints carries `workflowType=machine_learning`, and the experiment is tagged
# with the kind MLflow itself writes when a user picks "custom model development".
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# A view of the runs table shared through an experiment tag (what the UI's "share view" writes): the columns
# Recall@1, MAP@R and the training loss first, then MLflow's defaults; the link selects it (`viewStateShareKey`).
RUNS_VIEW_KEY = "proxygml-runs"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
TRAIN_LOSS = "Train/loss"  # the loop's key (trainer/loop.py TRAIN_PREFIX): its chart section comes first
_COLUMNS = ["metrics.`eval/recall_at_1`", "metrics.`eval/map_at_r`", f"metrics.`{TRAIN_LOSS}`", "attributes.`Dataset`",
            "attributes.`Source`", "attributes.`Models`"]
RUNS_VIEW = {"selectedColumns": _COLUMNS, "columnOrder": _COLUMNS}  # the metrics first, right after the run's name


def runs_page_url(ui: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's training runs (the model-training view, the shared runs view)."""
    return (f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={RUNS_VIEW_KEY}")


def apply_http_defaults() -> None:
    """Short HTTP timeouts for MLflow's client unless the environment sets them (HTTP_DEFAULTS)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


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


def credentials_to_environment(uri: str) -> str:
    """`uri` without its user info; a `user:password` there goes to MLFLOW_TRACKING_USERNAME / _PASSWORD of this
    process, where MLflow's HTTP client reads them (and trainer/redact.py masks the password in any output)."""
    clean, user, password = split_userinfo(uri)
    if password is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return clean


class Store:
    """MLflow calls for one tracking URI; applies the tracker's events (also used by the upload CLI)."""

    def __init__(self, uri: str, artifact_root: str | None = None):
        from mlflow import MlflowClient

        uri = credentials_to_environment(uri)  # MLflow prints its URI (run links): it holds no password
        self.uri = uri
        self.artifact_root = artifact_root
        self.experiment_id: str | None = None  # known once ensure_run has answered
        db = sqlite_path(uri)
        if db is None:
            self.client = MlflowClient(tracking_uri=uri)
            return
        # Opening a SQLite store creates its schema when it has none; runs starting together on a new store race
        # there ("duplicate column name"). One process at a time does it, under a lock file beside the store, and
        # leaves `<db>.ready` (the MLflow version that opened it): later runs open a ready store without the lock
        # (opening takes seconds of CPU: eight runs in a row behind one lock wait a minute on a loaded machine).
        from filelock import FileLock

        _sqlite_busy_timeout()
        db.parent.mkdir(parents=True, exist_ok=True)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial ... tables"
        ready = Path(f"{db}.ready")
        if _store_ready(db, ready):
            self.client = MlflowClient(tracking_uri=uri)
            self.client.search_experiments(max_results=1)
            return
        with FileLock(f"{db}.lock", timeout=STORE_LOCK_WAIT_S):
            self.client = MlflowClient(tracking_uri=uri)
            self.client.search_experiments(max_results=1)  # the store is ready before the lock is let go
            ready.write_text(_mlflow_version())

    def ensure_run(self, experiment: str, run_name: str, run_id: str | None, reopen: bool = True) -> str:
        """The id of run `run_id` (set RUNNING again if `reopen`), or of a new run when it is None or unknown."""
        from mlflow.exceptions import MlflowException

        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as e:
                if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise
                warnings.warn(f"Tracker: MLflow run {run_id} does not exist at {redact(self.uri)}; starting a new run",
                              RuntimeWarning, stacklevel=3)
            else:
                if reopen and run.info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
                self.experiment_id = run.info.experiment_id
                self._show_training_runs(self.experiment_id)
                return run_id
        self.experiment_id = self._experiment_id(experiment)
        return self.client.create_run(self.experiment_id, run_name=run_name or None).info.run_id

    def _show_training_runs(self, experiment_id: str) -> None:
        """Tag the experiment so that the UI opens on its training runs (see EXPERIMENT_KIND, RUNS_VIEW). A store
        that refuses (e.g. a server where this user may log runs but not edit the experiment) costs only the view."""
        from mlflow.exceptions import MlflowException

        try:
            tags = self.client.get_experiment(experiment_id).tags
            want = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, RUNS_VIEW_TAG: json.dumps(RUNS_VIEW)}
            for key, value in want.items():
                if key not in tags:  # a kind or view the user chose stays
                    self.client.set_experiment_tag(experiment_id, key, value)
        except MlflowException as e:
            warnings.warn(f"Tracker: could not tag experiment {experiment_id} with its runs view ({e}); the runs "
                          "are logged all the same", RuntimeWarning, stacklevel=3)

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            experiment_id = exp.experiment_id
        else:
            location = f"{Path(self.artifact_root).as_uri()}/{name}" if self.artifact_root else None
            try:
                experiment_id = self.client.create_experiment(name, artifact_location=location)
            except MlflowException:  # created meanwhile by another process
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
                experiment_id = exp.experiment_id
        self._show_training_runs(experiment_id)
        return experiment_id

    def apply(self, run_id: str, event: dict, base: Path | None = None) -> None:
        """Apply one tracker event; `base`: the run's tracking folder (where an offline model is kept)."""
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
        elif op == "model":  # the folder beside the pending file, whatever path the run wrote it from
            self.log_model(run_id, load_offline_model(Path(base or Path(event["local"]).parent) / OFFLINE_MODEL_DIR))
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
            info = mlflow.pytorch.log_model(model, name="model", run_id=run_id, **model_options())
        self.client.set_tag(run_id, "model_uri", info.model_uri)


OFFLINE_MODEL_DIR = "model"  # under the run's tracking folder: a model kept while the store was unreachable
OFFLINE_WEIGHTS, OFFLINE_RECIPE = "model.safetensors", "recipe.json"


def save_offline_model(model, folder: Path) -> dict:
    """Keep an embedder (trainer.model.Embedder) as data only: its tensors in `model.safetensors`, the `model`
    config section that rebuilds it in `recipe.json`. Returns the pending event; ValueError for a module that
    carries no such config (it could only be kept as a pickle, which the upload would refuse)."""
    import shutil

    from safetensors.torch import save_model

    config = getattr(model, "model_config", None)
    if not isinstance(config, dict):
        raise ValueError(f"a {type(model).__name__} has no `model_config` to rebuild it from (only the trainer's "
                         "embedder is kept offline); it is not logged")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save_model(model, str(folder / OFFLINE_WEIGHTS))
    (folder / OFFLINE_RECIPE).write_text(json.dumps({"builder": "trainer.model.build_model", "model": config},
                                                    indent=1))
    return {"op": "model", "local": str(folder), "format": "safetensors"}


def load_offline_model(folder: Path):
    """The embedder kept by save_offline_model, rebuilt from its recipe with random weights, then its tensors
    (strict). Runs no code from the folder: only `recipe.json` (JSON) and `model.safetensors` are read; anything
    else (e.g. a pickled model) raises UnsafeFileError (one line naming the file, exit 2)."""
    from safetensors.torch import load_model

    from trainer.model import build_model, model_config_from_dict
    from trainer.safe_load import UnsafeFileError

    allowed = {OFFLINE_WEIGHTS, OFFLINE_RECIPE}
    others = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in allowed)
    if others or not (folder / OFFLINE_RECIPE).is_file() or not (folder / OFFLINE_WEIGHTS).is_file():
        bad = others[0] if others else folder / OFFLINE_RECIPE
        raise UnsafeFileError(f"{bad}: not loaded: an offline model is kept as {OFFLINE_RECIPE} and {OFFLINE_WEIGHTS} "
                              "only (tensors and plain data; a pickled model could run code while loading)")
    try:
        recipe = json.loads((folder / OFFLINE_RECIPE).read_text())
        if recipe.get("builder") != "trainer.model.build_model" or not isinstance(recipe.get("model"), dict):
            raise ValueError("not a recipe of trainer.model.build_model")
        model = build_model(model_config_from_dict(recipe["model"]), load_weights=False)
        load_model(model, str(folder / OFFLINE_WEIGHTS), strict=True, device="cpu")
    except (ValueError, RuntimeError, OSError) as e:
        raise UnsafeFileError(f"{folder}: not loaded: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    return model.eval()


def _mlflow_version() -> str:
    return importlib.metadata.version("mlflow")


def _store_ready(db: Path, ready: Path) -> bool:
    """Whether this MLflow version already opened the SQLite store `db` (its schema is made)."""
    try:
        return db.stat().st_size > 0 and ready.read_text() == _mlflow_version()
    except OSError:
        return False


def _set_busy_timeout(dbapi_connection, _record) -> None:
    import sqlite3

    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")


def _sqlite_busy_timeout() -> None:
    """Every SQLite connection of this process waits SQLITE_BUSY_TIMEOUT_MS for other writers (pysqlite's default is
    5 s; MLflow sets 20 s per session but not on the connections that open the store)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "connect", _set_busy_timeout):
        event.listen(Engine, "connect", _set_busy_timeout)


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
    """mlflow.pytorch warns on every pickled model; the tracker chose pickle on purpose (see model_options)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()


logging.getLogger("mlflow.pytorch").addFilter(_QuietPickleWarning())


def model_options() -> dict:
    """mlflow.pytorch options: the pickled nn.Module (mlflow 3.17's default 'pt2' needs an input example
    and loads back as an exported graph), pinned requirements instead of a slow inference subprocess."""
    return {"serialization_format": "pickle", "pip_requirements": _pip_requirements()}


def _pip_requirements() -> list[str]:
    reqs = []
    for pkg in ("torch", "torchvision", "timm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            reqs.append(f"{pkg}=={importlib.metadata.version(pkg)}")
    return reqs
