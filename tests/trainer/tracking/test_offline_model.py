"""A model kept in a run's offline queue (tracking/model) is data only: the upload CLI rebuilds it from its recipe and
loads its tensors, and refuses anything else in one line naming the file, with exit status 2, without running it
(issue 25, item 1: a run directory received from elsewhere runs no code on upload)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings

import mlflow
import pytest
import torch

from tests.helpers import free_port
from tests.trainer.tracking.test_tracking import ROOT, client_for, no_mlflow_env, tiny_embedder  # noqa: F401
from trainer import tracking
from trainer.config import TrackingConfig
from trainer.tracking import Tracker


class Payload:
    """Unpickling this creates the marker file: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def offline_run(run_dir, model):
    """A run whose server never answers: everything, the model too, waits in tracking/mlflow/pending.jsonl."""
    cfg = TrackingConfig(enabled=True, tracking_uri=f"http://127.0.0.1:{free_port()}", experiment="offline")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = Tracker(cfg, run_dir, config={"model": {"dim": 8}})
        tracker.log_metrics({"loss": 0.5}, 0)
        tracker.log_model(model)
        tracker.close()
    return run_dir / "tracking" / "mlflow"


def upload(run_dir, db, tmp_path):
    return subprocess.run([sys.executable, "-m", "trainer.tracking", "upload", str(run_dir), "--tracking-uri", db],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow  # 26 s; test_untrusted_files keeps the kind in the default run
@pytest.mark.timeout(600)
def test_offline_model_is_data_and_a_pickled_one_is_refused(tmp_path):
    model = tiny_embedder()
    tdir = offline_run(tmp_path / "good", model)
    assert sorted(p.name for p in (tdir / "model").iterdir()) == ["model.safetensors", "recipe.json"]
    db = f"sqlite:///{tmp_path / 'store.db'}"
    out = upload(tmp_path / "good", db, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_id = json.loads((tdir / "state.json").read_text())["run_id"]
    assert client_for(db).get_run(run_id).info.status == "FINISHED"
    with tracking.mlflow_globals(db):
        loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    # a run directory from elsewhere: its queued model is a pickle (mlflow.pytorch's layout) that runs code
    tdir = offline_run(tmp_path / "bad", tiny_embedder())
    marker = tmp_path / "code-ran"
    crafted = tdir / "model" / "data" / "model.pth"
    crafted.parent.mkdir()
    crafted.write_bytes(pickle.dumps(Payload(marker)))
    (tdir / "model" / "MLmodel").write_text("flavors:\n  pytorch:\n    model_data: data\n")
    before = (tdir / "pending.jsonl").read_text()
    out = upload(tmp_path / "bad", db, tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "MLmodel" in out.stderr and "not loaded" in out.stderr
    assert not marker.exists(), "the upload ran the queued file's code"
    after = (tdir / "pending.jsonl").read_text().splitlines()
    assert [json.loads(e)["op"] for e in after] == ["model", "end"] and before.endswith("\n".join(after) + "\n")

    # the recipe is JSON only, and must name the trainer's builder
    (tdir / "model" / "MLmodel").unlink()
    crafted.unlink()
    crafted.parent.rmdir()
    (tdir / "model" / "recipe.json").write_text(json.dumps({"builder": "os.system", "model": {"dim": 8}}))
    out = upload(tmp_path / "bad", db, tmp_path)
    assert out.returncode == 2 and "recipe" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_module_without_recipe_is_not_kept_as_a_pickle(tmp_path):
    cfg = TrackingConfig(enabled=True, tracking_uri=f"http://127.0.0.1:{free_port()}", experiment="offline")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(cfg, tmp_path / "r")
        tracker.log_model(torch.nn.Linear(3, 2))
        tracker.close()
    assert any("could not be kept offline" in str(w.message) for w in caught)
    ops = [json.loads(e)["op"] for e in tracker.pending.read_text().splitlines()]
    assert "model" not in ops and not (tmp_path / "r" / "tracking" / "mlflow" / "model").exists()
