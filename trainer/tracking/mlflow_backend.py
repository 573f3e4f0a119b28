"""The MLflow tracking backend: a run of an MLflow experiment at `tracking.tracking_uri` (else $MLFLOW_TRACKING_URI,
else the SQLite file `<run.output_dir>/mlflow.db`, artifacts beside it in `mlartifacts/`). The MLflow calls
themselves are trainer.tracking.store's."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from trainer.redact import is_redacted, redact
from trainer.tracking.backend import TrackingBackend
from trainer.tracking.store import (
    Store,
    apply_http_defaults,
    default_tracking_uri,
    is_local_store,
    resolve_tracking_uri,
)


def store_busy(error: BaseException) -> bool:
    """Whether an error is a local store being busy (SQLite `database is locked`, the store-creation lock file
    held by another process): a reason to retry, not a failure."""
    from filelock import Timeout

    return isinstance(error, Timeout) or "database is locked" in str(error) or "database is busy" in str(error)


def login_refused(error: BaseException) -> bool:
    """Whether an MLflow error is the server refusing this client's credentials (HTTP 401, or 403 at start)."""
    code = getattr(error, "error_code", "")
    return code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or " 401 != 200" in str(error)


class MlflowBackend(TrackingBackend):
    """A run of MLflow experiment `tracking.experiment` (default `proxygml`) named `tracking.run_name` (default: the
    run directory's name). A server with a login (MLflow's basic-auth app) gets it from MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD, or from the URI's user info (moved to those variables; stored nowhere here)."""

    title = "MLflow"

    def __init__(self, cfg: Any, run_dir: Path):
        apply_http_defaults()
        run_dir = Path(run_dir)
        self.uri = resolve_tracking_uri(getattr(cfg, "tracking_uri", ""), run_dir)
        default_store = self.uri == default_tracking_uri(run_dir)
        self.artifact_root = str(run_dir.resolve().parent / "mlartifacts") if default_store else None
        self.experiment = cfg.experiment or "proxygml"
        self.run_name = cfg.run_name or run_dir.name
        self.local = is_local_store(self.uri)
        self.where = self.uri
        self.store: Store | None = None  # connected by open()
        self.experiment_id: str | None = None  # known once open() has answered

    def open(self, run_id: str | None, reopen: bool = True) -> str:
        if self.store is None:  # creating the client already touches a SQLite store
            self.store = Store(self.uri, self.artifact_root)
        run_id = self.store.ensure_run(self.experiment, self.run_name, run_id, reopen=reopen)
        self.experiment_id = self.store.experiment_id
        return run_id

    def apply(self, run_id: str, event: dict, folder: Path) -> None:
        if self.store is None:
            raise RuntimeError("MlflowBackend.apply: open() first")
        if event["op"] == "model_object":
            self.store.log_model(run_id, event["model"])
        else:
            self.store.apply(run_id, event, base=folder)

    def state(self) -> dict:
        state = {"tracking_uri": redact(self.uri), "experiment": self.experiment, "run_name": self.run_name}
        if self.artifact_root is not None:
            state["artifact_root"] = self.artifact_root
        return state

    @classmethod
    def for_upload(cls, state: dict, run_dir: Path, target: str | None = None) -> MlflowBackend:
        """The URI: `target`, else the run's, unless that one was kept without its credentials, then
        $MLFLOW_TRACKING_URI; FileNotFoundError when there is none to use."""
        uri = target or state["tracking_uri"]
        if is_redacted(uri):  # state.json keeps no credentials: they come from the command line or the environment
            uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
            if not uri:
                raise FileNotFoundError(f"upload: {Path(run_dir) / 'tracking'} keeps the tracking URI without its "
                                        f"credentials ({state['tracking_uri']}); give it: --tracking-uri URI, or set "
                                        "MLFLOW_TRACKING_URI (or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")
        backend = cls(SimpleNamespace(tracking_uri=uri, experiment=state["experiment"], run_name=state["run_name"]),
                      run_dir)
        backend.artifact_root = state.get("artifact_root")
        return backend

    def busy(self, error: BaseException) -> bool:
        return store_busy(error)

    def refusal(self, error: BaseException) -> str | None:
        if not login_refused(error):
            return None
        return (f"tracking.tracking_uri: the MLflow server at {self.uri} refused the login "
                f"({getattr(error, 'error_code', '') or 'HTTP 401'}); set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to an account of that server with access to experiment "
                + repr(self.experiment) + " (or tracking.enabled=false)")
