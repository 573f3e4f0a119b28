"""`python -m trainer.tracking upload RUN_DIR [--tracking-uri URI]`: send the events a run kept locally
(tracking/pending.jsonl) while its MLflow store was unreachable, into the run of its state.json."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from trainer.errors import UserError
from trainer.redact import is_redacted, redact
from trainer.tracking.sender import TRACKING_DIR
from trainer.tracking.store import Store, apply_http_defaults

DESCRIPTION = "MLflow tracking of a training run: rank 0 logs, every other rank (and disabled tracking) does nothing."


def upload(run_dir: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """Send a run directory's pending events (written while the server was down); returns the run id.
    The URI: `tracking_uri`, else the run's (state.json), unless that one was kept without its credentials,
    then $MLFLOW_TRACKING_URI; FileNotFoundError when there is none to use."""
    tdir = Path(run_dir) / TRACKING_DIR
    state_path = tdir / "state.json"
    if not state_path.exists():
        raise FileNotFoundError(f"upload: {state_path} not found: {run_dir!r} is not a tracked run directory")
    state = json.loads(state_path.read_text())
    uri = tracking_uri or state["tracking_uri"]
    if is_redacted(uri):  # state.json keeps no credentials: they come from the command line or the environment
        uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
        if not uri:
            raise FileNotFoundError(f"upload: {state_path} keeps the tracking URI without its credentials "
                                    f"({state['tracking_uri']}); give it: --tracking-uri URI, or set "
                                    f"MLFLOW_TRACKING_URI (or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")
    apply_http_defaults()
    store = Store(uri, state.get("artifact_root"))
    run_id = store.ensure_run(state["experiment"], state["run_name"], state.get("run_id"), reopen=False)
    n = store.replay(run_id, tdir / "pending.jsonl")
    state.update({"run_id": run_id, "tracking_uri": redact(uri)})
    state_path.write_text(json.dumps(state, indent=1))
    print(f"uploaded {n} pending events of {run_dir} to run {run_id} at {redact(uri)}")
    return run_id


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status: 0, or 2 with one line on stderr when the run directory is not a tracked
    run (no tracking/state.json) or a kept model is anything but data (store.load_offline_model)."""
    parser = argparse.ArgumentParser(prog="python -m trainer.tracking", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="send the events a run kept locally while MLflow was unreachable")
    up.add_argument("run_dir")
    up.add_argument("--tracking-uri", default=None, help="default: the URI the run used (tracking/state.json)")
    args = parser.parse_args(argv)
    if args.command == "upload":
        try:
            upload(args.run_dir, args.tracking_uri)
        except (FileNotFoundError, UserError) as e:
            print(redact(f"error: {e}"), file=sys.stderr)
            return 2
    return 0
