"""`python -m trainer.tracking upload RUN_DIR [--tracking-uri URI]`: send the events a run kept locally while a
tracking store was unreachable (each backend's queue, tracking/<backend>/pending.jsonl; MLflow's also in the layout
of earlier versions, tracking/pending.jsonl), into the run of the queue's state.json."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer.errors import UserError
from trainer.redact import redact
from trainer.tracking.backend import get_backend
from trainer.tracking.sender import TRACKING_DIR, read_state, replay, upgrade_layout, write_state

DESCRIPTION = "Tracking of a training run: rank 0 logs, every other rank (and disabled tracking) does nothing."


def upload(run_dir: str | os.PathLike, tracking_uri: str | None = None) -> dict[str, str]:
    """Send a run directory's pending events (written while a store was down), queue by queue; returns
    {backend: run id} of the queues uploaded. `tracking_uri` (the CLI's --tracking-uri, for MLflow): else the
    run's (its state.json), unless that one was kept without its credentials, then $MLFLOW_TRACKING_URI.
    FileNotFoundError when there is none to use, or when `run_dir` is not a tracked run directory; UserError for a
    queue of a backend that is not registered or does not upload."""
    tdir = Path(run_dir) / TRACKING_DIR
    if not (tdir / "state.json").exists():
        raise FileNotFoundError(f"upload: {tdir / 'state.json'} not found: {run_dir!r} is not a tracked run directory")
    upgrade_layout(tdir)
    queues = sorted(p.parent for p in tdir.glob("*/state.json"))
    uploaded = {}
    for folder in queues:
        name, state = folder.name, read_state(folder)
        if not (folder / "pending.jsonl").exists():
            continue
        try:
            cls = get_backend(name)
        except ValueError as e:
            raise UserError(f"upload: {folder} is the queue of a tracking backend that is not registered ({e})") \
                from None
        backend = cls.for_upload(state, Path(run_dir), tracking_uri)
        try:
            run_id = backend.open(state.get("run_id"), reopen=False)
            n = replay(backend, run_id, folder / "pending.jsonl")
        except Exception as e:  # noqa: BLE001 - the store is down or refuses: the queue keeps what was not sent
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"upload: {backend} did not take the events ({type(e).__name__}: {first}); what was not "
                            f"sent stays in {folder / 'pending.jsonl'}: run the same command again once it answers, "
                            f"or give another store with --tracking-uri URI") from None
        finally:
            backend.close()
        write_state(folder, {**state, **backend.state(), "run_id": run_id})
        print(redact(f"uploaded {n} pending events of {run_dir} to {name} run {run_id} at {backend.where}"))
        uploaded[name] = run_id
    if not uploaded:
        print(f"nothing pending in {tdir}: every event of {run_dir} was delivered")
    return uploaded


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status: 0, or 2 with one line on stderr when the run directory is not a tracked
    run (no tracking/state.json) or a kept model is anything but data (store.load_offline_model)."""
    parser = argparse.ArgumentParser(prog="python -m trainer.tracking", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="send the events a run kept locally while a tracking store was unreachable")
    up.add_argument("run_dir")
    up.add_argument("--tracking-uri", default=None, help="MLflow's; default: the URI the run used "
                                                         "(tracking/mlflow/state.json)")
    args = parser.parse_args(argv)
    if args.command == "upload":
        try:
            upload(args.run_dir, args.tracking_uri)
        except (FileNotFoundError, UserError) as e:
            print(redact(f"error: {e}"), file=sys.stderr)
            return 2
    return 0
