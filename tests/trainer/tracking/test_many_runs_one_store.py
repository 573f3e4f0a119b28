"""Many short tracked runs sharing one local SQLite store, several at a time (issue 25, item 12): every run ends with
every event delivered (no pending.jsonl), its status set (FINISHED), no traceback and no word of an unreachable
server. Real `python -m trainer` processes on one real store."""
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.trainer.test_trainer_loop import clean_env, tiny


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
        pending = run_dir / "tracking" / "pending.jsonl"
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
        state = out / f"r{i:03d}" / "tracking" / "state.json"
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
