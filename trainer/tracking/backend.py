"""Tracking backends: where a run's events go. The Tracker turns each call into backend-neutral events (dicts with an
`op`); one sender per backend (trainer.tracking.sender) delivers them in order, or keeps them in that backend's
queue `<run_dir>/tracking/<name>/pending.jsonl` while it fails. A backend is a TrackingBackend subclass registered
under a name; `tracking.backends` lists the names a run logs to.

    register_backend("mlflow", MlflowBackend)   # trainer/tracking/__init__.py
    backends()                                  # {"mlflow": MlflowBackend}

The events (every value JSON, except `model_object`'s module):

    {"op": "params", "params": {str: str}}                 once per run (a resumed run sends them again)
    {"op": "metrics", "step": int, "timestamp": ms, "metrics": {str: float}}
    {"op": "tags", "tags": {str: str}}                     replaced on each call (e.g. the run's description)
    {"op": "artifacts", "local": folder, "artifact_path": str | None}   files under <run_dir>/tracking/artifacts/
    {"op": "dataset", "name": str, "digest": str, "location": str, "profile": {str: int}, "context": str}
    {"op": "model_object", "model": torch.nn.Module}       live (a CPU copy); never kept on disk as is
    {"op": "model", "local": folder, "format": "safetensors"}  the same, kept offline (<queue>/model/)
    {"op": "end", "status": "FINISHED" | "FAILED" | "KILLED", "timestamp": ms}
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from registry import Registry
from trainer.errors import UserError


class TrackingBackend(ABC):
    """One place a run's events go, for one run directory. Made on rank 0 when the run starts (contacting nothing);
    every other call comes from that backend's sender thread, in order. A method that fails raises: the sender keeps
    the event in the queue and tries again later (an error `busy` calls a local store's busy moment, retried
    without a warning).

    cfg: the `tracking` config section (trainer.config.TrackingConfig); run_dir: the run directory."""

    title: ClassVar[str] = ""  # how messages name it ("MLflow"); default: the class name
    local: bool = True  # a store on this machine (only ever busy): waits follow its progress, not a clock
    where: str = ""  # where it logs, for messages (a URI, a file)

    @abstractmethod
    def __init__(self, cfg: Any, run_dir: Path):
        ...

    @abstractmethod
    def open(self, run_id: str | None, reopen: bool = True) -> str:
        """Connect, and return the id of run `run_id` (set running again if `reopen`), or of a new run when it is
        None or unknown to the store."""

    @abstractmethod
    def apply(self, run_id: str, event: dict, folder: Path) -> None:
        """Log one event (see the module docstring) to run `run_id`; `folder` is this backend's queue folder
        (an offline model is kept in `folder/model`). ValueError for an unknown op."""

    def close(self) -> None:  # noqa: B027 (optional: most backends hold nothing to release)
        """Release what open() took (clients, files); the sender calls it once, when the run ends."""

    def state(self) -> dict:
        """What `for_upload` needs to reach the same store again (JSON, no credentials); kept in the queue's
        state.json beside the run id."""
        return {}

    @classmethod
    def for_upload(cls, state: dict, run_dir: Path, target: str | None = None) -> TrackingBackend:
        """The backend that uploads a queue kept by a run (`python -m trainer.tracking upload`), from what
        `state()` kept; `target`: the CLI's --tracking-uri (None: the run's own). Raises UserError when it cannot."""
        raise UserError(f"upload: the {cls.__name__} tracking backend does not upload a kept queue")

    def busy(self, error: BaseException) -> bool:
        """Whether `error` is a local store being busy (other runs writing it): retried, not a failure."""
        return False

    def refusal(self, error: BaseException) -> str | None:
        """The one-line message when `error` is the store refusing this client's login at the first connection
        (the run then stops before training: LoginRefused), else None."""
        return None

    def __str__(self) -> str:
        return f"{self.title or type(self).__name__} at {self.where}" if self.where else \
            (self.title or type(self).__name__)


_BACKENDS: Registry[type[TrackingBackend]] = Registry("tracking backend")


def register_backend(name: str, cls: type[TrackingBackend]) -> None:
    """Make `cls` the tracking backend `name` (a value of `tracking.backends`). ValueError if the name is taken
    by another class or is not a plain folder name (the queue lives in `tracking/<name>/`)."""
    if not (isinstance(cls, type) and issubclass(cls, TrackingBackend)):
        raise TypeError(f"register_backend({name!r}): {cls!r} is not a TrackingBackend subclass")
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"register_backend: {name!r} is not a plain name (letters, digits, - and _)")
    _BACKENDS.add(name, cls)


def unregister_backend(name: str) -> None:
    """Forget backend `name` (tests that registered one); no error when it is not registered."""
    _BACKENDS.remove(name)


def backends() -> dict[str, type[TrackingBackend]]:
    """The registered backends by name, in registration order (a copy)."""
    return _BACKENDS.as_dict()


def get_backend(name: str) -> type[TrackingBackend]:
    """The backend class registered as `name`; ValueError naming the registered ones otherwise."""
    return _BACKENDS.get(name, "tracking.backends")
