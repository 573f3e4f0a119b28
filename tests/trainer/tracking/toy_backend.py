"""A toy tracking backend, the whole of it in this one file: every event it receives goes, with its run id, as one
JSON line to `<run_dir>/toy_tracking.jsonl`. The tests register it with one line:
`register_backend("toy", ToyBackend)`, and then `tracking.backends=[mlflow,toy]` logs a run to both."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

from trainer.tracking import TrackingBackend

FILE = "toy_tracking.jsonl"


def read_events(path: Path) -> list[dict]:
    """The lines the toy backend wrote ([] before any)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class ToyBackend(TrackingBackend):
    title = "toy"

    def __init__(self, cfg, run_dir: Path):
        self.path = Path(run_dir) / FILE
        self.where = str(self.path)

    def open(self, run_id: str | None, reopen: bool = True) -> str:
        """The same run when its id is in the file, else a new one (a `run` line)."""
        if run_id not in {e["run_id"] for e in read_events(self.path) if e["op"] == "run"}:
            run_id = uuid.uuid4().hex
        self._write({"op": "run", "run_id": run_id})
        return run_id

    def apply(self, run_id: str, event: dict, folder: Path) -> None:
        if event["op"] == "model_object":  # a live module: its size stands for it
            event = {"op": "model", "parameters": sum(p.numel() for p in event["model"].parameters())}
        self._write({**event, "run_id": run_id})

    def _write(self, line: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
