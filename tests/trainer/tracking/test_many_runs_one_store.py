"""Many short tracked runs sharing one local SQLite store, several at a time (issue 25, item 12): every run ends with
every event delivered (no pending.jsonl), its status set, no traceback and no word of an unreachable server.
Real processes on one real store: tracker-only runs (default run, while another process holds the store's write
lock) and `python -m trainer` runs (slow)."""
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import trainer
from tests.trainer.test_trainer_loop import clean_env, tiny

STEPS = 5
TRACKED_RUN = f"""
import sys
from trainer.config import TrackingConfig
from trainer.tracking import Tracker

out, name = sys.argv[1], sys.argv[2]
cfg = TrackingConfig(enabled=True, tracking_uri=f"sqlite:///{{out}}/mlflow.db", experiment="many", run_name=name)
tracker = Tracker(cfg, f"{{out}}/{{name}}", config={{"train": {{"lr": 0.1}}, "model": {{"dim": 8}}}})
for step in range({STEPS}):
    tracker.log_metrics({{"loss": 1.0 / (step + 1)}}, step)
tracker.close("FINISHED")
"""
SAID_WRONG = ("Traceback", "Error", "Warning", "unreachable", "did not", "could not", "failed")


def tracked_run(out: Path, name: str):
    """One short tracked run in its own process (the tracker only, tiny payloads); (exit status, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(Path(trainer.__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", TRACKED_RUN, str(out), name], capture_output=True, text=True,
                       timeout=400, env=env)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.slow  # 44 s; test_tracking_concurrent keeps concurrent runs on one store in the default run
@pytest.mark.timeout(600)
def test_eight_tracked_runs_at_once_while_the_store_is_held(tmp_path):
    """8 runs start together on one SQLite store while another process holds its write lock for 35 s (a long
    write of another run, a backup): each waits for the store, then delivers everything: FINISHED, every metric,
    nothing pending, nothing printed."""
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    client.search_experiments()  # the store made once, as a team would
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(35.0, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: tracked_run(tmp_path, f"t{i}"), range(8)))
    finally:
        release.join()
        holder.close()
    problems = []
    for i, (code, said) in enumerate(results):
        run_dir = tmp_path / f"t{i}"
        if code != 0 or any(word in said for word in SAID_WRONG):
            problems.append(f"t{i}: exit {code}: {said[-1200:]}")
        if (run_dir / "tracking" / "mlflow" / "pending.jsonl").exists():
            problems.append(f"t{i}: events left in pending.jsonl")
        run_id = json.loads((run_dir / "tracking" / "mlflow" / "state.json").read_text())["run_id"]
        if run_id is None:
            problems.append(f"t{i}: no MLflow run was ever created")
            continue
        run = client.get_run(run_id)
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        if run.info.status != "FINISHED" or steps != list(range(STEPS)) or run.data.params.get("train.lr") != "0.1":
            problems.append(f"t{i}: status {run.info.status}, loss steps {steps}, params {run.data.params}")
    assert not problems, "\n".join(problems)


def one_run(shards, out, i):
    args = tiny(shards, out, f"run.name=r{i:03d}", "tracking.enabled=true", "train.max_steps=3",
                "tracking.log_every_steps=1", "eval.every_epochs=0", f"tracking.tracking_uri=sqlite:///{out}/mlflow.db",
                "checkpoint.format=torch")
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, timeout=600,
                       env=clean_env())
    return i, p.returncode, p.stdout + p.stderr, time.monotonic() - t


def many_runs(shards, out, runs, parallel):
    from mlflow.tracking import MlflowClient
    MlflowClient(f"sqlite:///{out}/mlflow.db").search_experiments()  # the store made once, as a team would
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(lambda i: one_run(shards, out, i), range(runs)))
    print(f"{runs} runs, {parallel} at a time: longest {max(r[3] for r in results):.0f} s")
    problems = []
    for i, code, said, _secs in results:
        run_dir = out / f"r{i:03d}"
        pending = run_dir / "tracking" / "mlflow" / "pending.jsonl"
        if code != 0:
            problems.append(f"r{i:03d}: exit {code}: {said[-1500:]}")
        for word in ("Traceback", "unreachable", "dictionary changed size", "did not answer"):
            if word in said:
                problems.append(f"r{i:03d}: {word!r} printed: {said[-1500:]}")
        if pending.exists():
            problems.append(f"r{i:03d}: {len(pending.read_text().splitlines())} events left in {pending}")
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    statuses = {}
    for i in range(runs):
        state = out / f"r{i:03d}" / "tracking" / "mlflow" / "state.json"
        if not state.exists():
            problems.append(f"r{i:03d}: no {state}")
            continue
        run_id = json.loads(state.read_text())["run_id"]
        if run_id is None:
            problems.append(f"r{i:03d}: no MLflow run was ever created (the store did not answer)")
            continue
        run = client.get_run(run_id)
        statuses[i] = run.info.status
        if run.info.status != "KILLED":  # stopped by train.max_steps: a run that may go on, KILLED like a stop
            problems.append(f"r{i:03d}: MLflow status {run.info.status}")
        if "loss" not in run.data.metrics:
            problems.append(f"r{i:03d}: no loss metric")
    return problems, [r[3] for r in results]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sixteen_runs_eight_at_a_time_share_one_sqlite_store(shards, tmp_path):
    problems, secs = many_runs(shards, tmp_path, runs=16, parallel=8)
    assert not problems, "\n".join(problems[:10])


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_hundred_runs_eight_at_a_time_share_one_sqlite_store(shards, tmp_path):
    problems, secs = many_runs(shards, tmp_path, runs=100, parallel=8)
    print(f"100 runs: {sum(secs):.0f} s of run time, longest {max(secs):.0f} s")
    assert not problems, "\n".join(problems[:10])


@pytest.mark.timeout(300)
def test_a_broken_local_store_is_not_waited_for(tmp_path):
    """A local store that fails for another reason than being busy (here: not a database) is not retried until the
    stall bound: one warning, the events kept in pending.jsonl, close() returns within seconds."""
    import warnings

    from trainer.config import TrackingConfig
    from trainer.tracking import Tracker

    db = tmp_path / "broken.db"
    db.write_bytes(b"not a database, " * 512)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(TrackingConfig(enabled=True, tracking_uri=f"sqlite:///{db}"), tmp_path / "r")
        tracker.log_metrics({"loss": 1.0}, 0)
        t0 = time.monotonic()
        tracker.close()
        closing = time.monotonic() - t0
    said = [str(w.message) for w in caught]
    assert closing < 30, f"close() waited {closing:.0f} s for a store that cannot work"
    assert any("failed" in m for m in said) and any("the local store did not take them" in m for m in said), said
    ops = [json.loads(e)["op"] for e in tracker.pending.read_text().splitlines()]
    assert ops[-2:] == ["metrics", "end"]
