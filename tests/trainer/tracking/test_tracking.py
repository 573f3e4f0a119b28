"""trainer.tracking against a real SQLite MLflow store: params, metrics, evaluation pictures and tables read
back from the store, proxy statistics, the model loaded back, resume, no-op ranks, offline + upload."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data_shards.lookup import shard_image_lookup
from loss.proxy_stats import reduced_proxy_statistics
from tests.helpers import free_port
from trainer import tracking
from trainer.config import Config, TrackingConfig
from trainer.tracking import Tracker, sender

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[3]  # the repository


@pytest.fixture(autouse=True)
def no_mlflow_env(monkeypatch):
    """Each test starts without MLflow's environment (a leaked MLFLOW_TRACKING_URI would redirect Trackers)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)


def full_config(extra_keys: int = 0):
    """The trainer's resolved config (a DictConfig), with `extra_keys` more keys to pass 100 params."""
    cfg = OmegaConf.structured(Config)
    cfg.data.root = "/data/shards"
    if extra_keys:
        cfg = OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(cfg)),
                              {"extra": {f"k{i}": i for i in range(extra_keys)}})
    return cfg


def client_for(tracker_or_uri):
    return mlflow.MlflowClient(getattr(tracker_or_uri, "uri", tracker_or_uri))


def tiny_embedder(dim: int = 8):
    """The trainer's embedder at its smallest (small_cnn, random weights): what the tracker can keep offline."""
    from trainer.config import ModelConfig
    from trainer.model import build_model

    return build_model(ModelConfig(backbone="small_cnn", pretrained=False, dim=dim, small_cnn_width=8), False).eval()


def metric_steps(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ----------------------------------------------------------------------------- a real evaluation


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A class-folder dataset of small PNGs written to webdataset shards by data_shards (test split: 6 classes)."""
    from data_shards import write_dataset

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in range(8):
        (root / "src" / f"class{c}").mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        for i in range(5):
            pixels = np.clip(colour + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "src" / f"class{c}" / f"img{i}.png")
    write_dataset("folder", root / "src", root / "shards", train_fraction=0.25, shard_size="4KB", progress=False)
    return root / "shards" / "test"


@pytest.fixture(scope="module")
def eval_result(shards):
    """trainer.evaluate.evaluate of a small fixed network over the test shards."""
    from data_shards import TransformConfig, eval_loader, read_manifest
    from trainer.config import EvalConfig
    from trainer.evaluation import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 8))
    loader = eval_loader(shards, batch_size=8, num_workers=0,
                         transform=TransformConfig(image_size=16, resize_size=16))
    cfg_eval = EvalConfig(nmi=False)
    result = evaluate(model, loader, device="cpu", recall_ks=cfg_eval.recall_ks, nmi=cfg_eval.nmi, map_r=cfg_eval.map_r,
                      class_names=read_manifest(shards).class_names)
    assert result.per_class is not None and len(result.per_class) == 6
    return result


def make_criterion(num_classes=6, n=2, dim=8):
    """A real ProxyGML after one forward pass: some proxies selected, some not."""
    from loss import ProxyGML

    torch.manual_seed(0)
    crit = ProxyGML(num_classes, dim, proxies_per_class=n)
    crit(torch.nn.functional.normalize(torch.randn(8, dim), dim=1), torch.randint(0, num_classes, (8,)))
    assert 0 < int((crit.selection_counts == 0).sum()) < num_classes * n
    return crit


# ----------------------------------------------------------------------------- SQLite store


def test_sqlite_end_to_end(tmp_path, shards, eval_result):
    run_dir = tmp_path / "runs" / "exp1"
    cfg = TrackingConfig(enabled=True, experiment="tests", run_name="e2e", retrieval_grid_queries=4)
    config = full_config(extra_keys=60)
    tracker = Tracker(cfg, run_dir, rank=0, config=config, world_size=2)
    assert tracker.uri == f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db"
    for step in range(1, 6):
        tracker.log_metrics({"loss": torch.tensor(1.0 / step), "loss_s": 0.5, "lr/backbone": 1e-4,
                             "img_per_s": np.float32(100.0), "data_wait_s": 0.01}, step)
    tracker.log_evaluation(eval_result, step=5, epoch=1, image_lookup=shard_image_lookup(shards))
    tracker.log_evaluation(eval_result, step=10, epoch=2, image_lookup=shard_image_lookup(shards))
    crit = make_criterion()
    counts_before = crit.selection_counts.clone()
    tracker.log_proxy_stats(reduced_proxy_statistics(crit), step=10)
    crit.reset_selection_counts()
    assert int(crit.selection_counts.sum()) == 0, "counts are reset after logging"
    tracker.log_proxy_stats(reduced_proxy_statistics(crit), step=11)  # no selections since: nothing logged
    crit.reset_selection_counts()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    tracker.log_model(model)
    tracker.close()
    assert tracker.online and not (run_dir / "tracking" / "pending.jsonl").exists()

    client = client_for(tracker)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    flat = tracking.flatten_config(config)
    assert len(flat) > 100 and run.data.params == flat  # more than one log_batch of params
    assert run.data.params["optim.lr_milestones"] == "[20, 40]"
    tags = run.data.tags
    assert tags["sys.world_size"] == "2" and tags["sys.pkg.mlflow"] == mlflow.__version__
    assert tags["sys.gpu"] and "sys.pkg.torch" in tags
    commit = tags["mlflow.source.git.commit"]  # HEAD then, an ancestor of HEAD now (others commit meanwhile)
    assert len(commit) == 40 and subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", commit,
                                                 "HEAD"]).returncode == 0
    assert metric_steps(client, tracker.run_id, "loss") == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)]
    assert metric_steps(client, tracker.run_id, "data_wait_s")[-1] == (5, 0.01)
    r1 = eval_result.metrics["recall_at_1"]
    assert metric_steps(client, tracker.run_id, "eval/recall_at_1") == [(5, r1), (10, r1)]
    assert metric_steps(client, tracker.run_id, "epoch") == [(5, 1.0), (10, 2.0)]
    per_class_r1 = eval_result.per_class["recall_at_1"]
    assert run.data.metrics["eval/class_r1/mean"] == pytest.approx(per_class_r1.mean())
    assert run.data.metrics["eval/class_r1/zero_share"] == pytest.approx((per_class_r1 == 0).mean())
    assert "R@1" in tags["eval.worst_classes"]
    assert "eval/class_r1/classes" not in run.data.metrics  # constant by construction: the dataset input says it
    # proxy summaries only: never one metric key per class or proxy
    assert not any(k.startswith("proxy/") and k[-1].isdigit() for k in run.data.metrics)
    counts = counts_before.numpy()
    assert metric_steps(client, tracker.run_id, "proxy/never_selected_share") == [
        (10, pytest.approx((counts == 0).mean()))]
    assert not (run_dir / "tracking" / "artifacts" / "proxies" / "step-000000011").exists()
    assert run.data.metrics["proxy/selections"] == counts.sum()
    assert len(run.data.metrics) < 40

    local = Path(mlflow.artifacts.download_artifacts(run_id=tracker.run_id, artifact_path="",
                                                     dst_path=str(tmp_path / "dl"), tracking_uri=tracker.uri))
    assert OmegaConf.load(local / "config.yaml").optim.lr_milestones == [20, 40]
    ev = local / "evaluations" / "step-000000010"
    table = pd.read_csv(ev / "per_class_recall.csv")
    assert len(table) == 6 and np.allclose(table["recall_at_1"], per_class_r1, atol=1e-5)
    header = (ev / "per_class_recall.csv").read_text().splitlines()[0]
    assert header == "class_name,recall_at_1,map_at_r,size,class_index"
    worst = pd.read_csv(ev / "worst_classes.csv")
    assert worst["recall_at_1"].is_monotonic_increasing
    for png in ("retrieval_grid.png", "recall_curve.png", "per_class_recall_hist.png"):
        with Image.open(ev / png) as im:
            im.load()
            assert im.width > 100 and im.height > 100
    with Image.open(ev / "retrieval_grid.png") as grid:
        assert grid.height == 40 + 4 * (112 + 14)  # the title and legend band, 4 query rows
    proxy_table = pd.read_csv(local / "proxies" / "step-000000010" / "proxy_selection.csv")
    assert proxy_table["selection_count"].tolist() == counts.tolist()
    assert len(pd.read_csv(local / "proxies" / "step-000000010" / "class_proxy_stats.csv")) == 6

    assert "MLFLOW_TRACKING_URI" not in os.environ  # logging the model left the environment alone
    with tracking.mlflow_globals(tracker.uri):
        loaded = mlflow.pytorch.load_model(f"runs:/{tracker.run_id}/model")
        by_uri = mlflow.pytorch.load_model(run.data.tags["model_uri"])
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(by_uri(x), model(x))


def test_resume_continues_the_same_run(tmp_path, eval_result):
    run_dir = tmp_path / "runs" / "r"
    cfg = TrackingConfig(enabled=True, experiment="resume")
    config = {"train": {"epochs": 2, "lr": 0.1}}
    first = Tracker(cfg, run_dir, rank=0, config=config)
    for step in range(3):
        first.log_metrics({"loss": float(step)}, step)
    first.log_evaluation(eval_result, 2, 1)
    first.close(status="KILLED")
    assert client_for(first).get_run(first.run_id).info.status == "KILLED"

    config["train"]["epochs"] = 4  # changed on resume: MLflow params cannot change, it becomes a tag
    second = Tracker(cfg, run_dir, rank=0, config=config, resume_run_ids={"mlflow": first.run_id})
    assert second.run_id == first.run_id
    assert client_for(second).get_run(second.run_id).info.status == "RUNNING"
    for step in range(3, 6):
        second.log_metrics({"loss": float(step)}, step)
    second.log_evaluation(eval_result, 5, 2)
    second.close()
    state = json.loads((run_dir / "tracking" / "state.json").read_text())
    assert [s for s, _ in state["eval_history"]] == [2, 5]  # the recall curve spans both processes
    client = client_for(second)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in metric_steps(client, run.info.run_id, "loss")] == list(range(6))
    assert run.data.params["train.epochs"] == "2" and run.data.tags["param_changed.train.epochs"] == "4"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_of_unknown_run_starts_a_new_one(tmp_path):
    cfg = TrackingConfig(enabled=True, experiment="resume2")
    with pytest.warns(RuntimeWarning, match="does not exist"):
        tracker = Tracker(cfg, tmp_path / "r", config={"a": 1},
                          resume_run_ids={"mlflow": "0123456789abcdef0123456789abcdef"})
    assert tracker.online and tracker.run_id != "0123456789abcdef0123456789abcdef"
    tracker.close()


def test_other_ranks_and_disabled_tracking_do_nothing(tmp_path):
    crit = make_criterion()
    for cfg, rank in ((TrackingConfig(enabled=True), 1), (TrackingConfig(enabled=False), 0)):
        tracker = Tracker(cfg, tmp_path / "run", rank=rank, config=full_config())
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.log_evaluation(None, 1, 1)
        tracker.log_model(torch.nn.Linear(2, 2))
        if cfg.enabled:
            tracker.log_proxy_stats(reduced_proxy_statistics(crit), 1)
        crit.reset_selection_counts()
        tracker.close()
        assert tracker.run_id is None and not tracker.online
        assert int(crit.selection_counts.sum()) == 0  # every rank resets its counts
    assert list(tmp_path.iterdir()) == []  # no store, no files


def test_bad_metric_value_names_the_key(tmp_path):
    tracker = Tracker(TrackingConfig(enabled=True), tmp_path / "r")
    with pytest.raises(ValueError, match="'loss'"):
        tracker.log_metrics({"loss": "high"}, 1)
    tracker.close()
    with pytest.raises(TypeError, match="config"):
        Tracker(TrackingConfig(enabled=True), tmp_path / "r2", config=[1, 2])


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri("", tmp_path / "a" / "run") == f"sqlite:///{tmp_path / 'a'}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.resolve_tracking_uri("", tmp_path / "run") == "http://127.0.0.1:1"
    assert tracking.resolve_tracking_uri("sqlite:///x.db", tmp_path / "run") == "sqlite:///x.db"


# ----------------------------------------------------------------------------- unreachable server


@pytest.mark.slow  # 12 s; test_tracking_server.py keeps a dead server in the default run
def test_unreachable_server_keeps_training_and_uploads_later(tmp_path):
    """Nothing listens at the URI: one warning, steps stay fast, events go to pending.jsonl; the CLI uploads
    them later (here into a SQLite store via --tracking-uri)."""
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(enabled=True, tracking_uri=f"http://127.0.0.1:{free_port()}", experiment="offline")
    with pytest.warns(RuntimeWarning, match="training goes on") as caught:
        t0 = time.monotonic()
        tracker = Tracker(cfg, run_dir, rank=0, config={"model": {"dim": 8}})
        for step in range(20):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
        model = tiny_embedder()
        tracker.log_model(model)
        elapsed = time.monotonic() - t0
    assert sum("training goes on" in str(w.message) for w in caught) == 1  # warned once
    assert elapsed < 60, f"a dead server stalled training for {elapsed:.0f} s"
    with pytest.warns(RuntimeWarning, match="python -m trainer.tracking upload"):
        tracker.close()
    assert tracker.run_id is None and not tracker.online
    pending = run_dir / "tracking" / "mlflow" / "pending.jsonl"
    ops = [json.loads(line)["op"] for line in pending.read_text().splitlines()]
    assert ops.count("metrics") == 20 and ops[-2:] == ["model", "end"] and "params" in ops

    db = f"sqlite:///{tmp_path / 'later.db'}"
    out = subprocess.run([sys.executable, "-m", "trainer.tracking", "upload", str(run_dir), "--tracking-uri", db],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert not pending.exists()
    run_id = json.loads((run_dir / "tracking" / "mlflow" / "state.json").read_text())["run_id"]
    client = client_for(db)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"model.dim": "8"}
    assert [s for s, _ in metric_steps(client, run_id, "loss")] == list(range(20))
    with tracking.mlflow_globals(db):
        loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.slow  # 17 s
def test_hung_server_never_blocks_a_step(tmp_path, monkeypatch):
    """A server that accepts connections and never answers: the steps do not wait for it (the sender thread
    does), Tracker() waits at most START_WAIT_S, and close() keeps everything locally."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(sender, "START_WAIT_S", 1.0)
    with socket.socket() as hung, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # the kernel completes the connections; nobody reads or answers
        cfg = TrackingConfig(enabled=True, tracking_uri=f"http://127.0.0.1:{hung.getsockname()[1]}")
        t0 = time.monotonic()
        tracker = Tracker(cfg, tmp_path / "run", config={"a": 1})
        t_start = time.monotonic() - t0
        t0 = time.monotonic()
        for step in range(50):
            tracker.log_metrics({"loss": 1.0}, step)
        t_steps = time.monotonic() - t0
        tracker.close()
    assert t_start < 5 and t_steps < 1, (t_start, t_steps)
    assert any("training goes on" in str(w.message) for w in caught)
    pending = (tmp_path / "run" / "tracking" / "mlflow" / "pending.jsonl").read_text().splitlines()
    ops = [json.loads(line)["op"] for line in pending]
    assert ops.count("metrics") == 50 and ops[-1] == "end"


# ----------------------------------------------------------------------------- pure helpers


def test_flatten_config_limits():
    flat = tracking.flatten_config({"a": {"b": [1, 2], "c": None, "d": {}}, "long": "x" * 7000, "k@1": 1})
    assert flat["a.b"] == "[1, 2]" and flat["a.c"] == "None" and flat["a.d"] == "{}"
    assert len(flat["long"]) == tracking.MAX_PARAM_VALUE and flat["long"].endswith("...")
    assert "k_at_1" in flat


def test_metric_key_is_legal_for_mlflow():
    from mlflow.utils.validation import _validate_metric_name

    for name in ("recall@1", "lr/backbone", "a b", "x(1)%", "eval/R@8"):
        _validate_metric_name(tracking.metric_key(name))
    assert tracking.metric_key("recall@4") == "recall_at_4"


def test_queries_are_fixed_and_neighbours_exclude_the_query():
    keys = [f"k{i:02d}" for i in range(20)]
    labels = np.repeat(np.arange(5), 4)
    q = tracking.pick_queries(keys, labels, 4)
    assert q.tolist() == tracking.pick_queries(keys[::-1][::-1], labels, 4).tolist()
    assert len(set(labels[q])) == 4  # one per class
    emb = torch.nn.functional.normalize(torch.randn(20, 6), dim=1)
    nb = tracking.nearest_neighbours(emb, q, k=8)
    assert nb.shape == (4, 8) and not (nb == q[:, None]).any()
    expected = (emb[q] @ emb.T).scatter(1, torch.as_tensor(q)[:, None], -2).topk(8).indices
    assert nb.tolist() == expected.tolist()
    assert tracking.nearest_neighbours(emb * torch.rand(20, 1) * 5, q, k=8).tolist() == nb.tolist()  # cosine


def test_grid_neighbours_agree_with_the_evaluation(eval_result):
    """The grid's first neighbour is right exactly as often as the evaluation's Recall@1 says."""
    labels = eval_result.labels.numpy()
    everyone = np.arange(len(labels))
    nb = tracking.nearest_neighbours(eval_result.embeddings, everyone, k=1)[:, 0]
    assert (labels[nb] == labels).mean() == pytest.approx(eval_result.metrics["recall_at_1"])


def test_shard_image_lookup_reads_by_tar_key_and_by_path(shards, eval_result):
    lookup = shard_image_lookup(shards)
    keys = eval_result.keys[:3]
    images = lookup(keys + ["no/such/key"])
    assert sorted(images) == sorted(keys)
    assert all(im.size == (24, 24) for im in images.values())
    assert len(lookup(["00000000"])) == 1 or len(lookup(["00000010"])) == 1
    with pytest.raises(FileNotFoundError, match="split_dir"):
        shard_image_lookup(shards / "nope")(["00000000"])


def test_store_back_during_the_run_gets_the_pending_events(tmp_path, monkeypatch):
    """The store fails at first (a file stands where its directory goes); once it works, the tracker's next retry
    replays everything kept so far into the run, in order, and carries on online."""
    store_dir = tmp_path / "later"
    uri = f"sqlite:///{store_dir}/mlflow.db"
    cfg = TrackingConfig(enabled=True, tracking_uri=uri, experiment="comeback")
    store_dir.write_text("in the way")
    with pytest.warns(RuntimeWarning, match="training goes on"):
        tracker = Tracker(cfg, tmp_path / "run", config={"a": {"b": 1}})
    for step in range(5):
        tracker.log_metrics({"loss": float(step)}, step)
    assert tracker.flush(timeout=120) and not tracker.online and tracker.run_id is None
    store_dir.unlink()
    monkeypatch.setattr(sender, "LOCAL_RETRY_INTERVAL_S", 3600.0)
    tracker.log_metrics({"loss": 5.0}, 5)  # within the retry interval: not retried yet
    assert tracker.flush(timeout=120) and not tracker.online
    monkeypatch.setattr(sender, "LOCAL_RETRY_INTERVAL_S", 0.0)
    for step in range(6, 8):
        tracker.log_metrics({"loss": float(step)}, step)
    assert tracker.flush(timeout=120) and tracker.online
    assert not (tmp_path / "run" / "tracking" / "mlflow" / "pending.jsonl").exists()
    tracker.close()
    client = client_for(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a.b": "1"}
    assert metric_steps(client, tracker.run_id, "loss") == [(s, float(s)) for s in range(8)]


def test_picture_failure_is_reported_not_fatal(tmp_path, eval_result):
    tracker = Tracker(TrackingConfig(enabled=True), tmp_path / "runs" / "r")
    with pytest.warns(RuntimeWarning, match="could not draw.*not a local directory"):
        tracker.log_evaluation(eval_result, 3, 1, image_lookup=shard_image_lookup(tmp_path / "remote"))
    tracker.close()
    run = client_for(tracker).get_run(tracker.run_id)
    assert run.data.metrics["eval/recall_at_1"] == eval_result.metrics["recall_at_1"]
    out = tmp_path / "runs" / "r" / "tracking" / "artifacts" / "evaluations" / "step-000000003"
    assert (out / "recall_curve.png").exists() and not (out / "retrieval_grid.png").exists()


def test_description_and_dataset_inputs_in_the_store(tmp_path, shards):
    from data_shards import read_manifest

    manifest = read_manifest(shards)
    tracker = Tracker(TrackingConfig(enabled=True, experiment="described"), tmp_path / "runs" / "d")
    tracker.set_description("**first**")
    tracker.set_description("**ProxyGML** on folder: Recall@1 0.9")  # replaced, not appended
    tracker.log_dataset(manifest, "test")
    tracker.close()
    run = client_for(tracker).get_run(tracker.run_id)
    assert run.data.tags["mlflow.note.content"] == "**ProxyGML** on folder: Recall@1 0.9"
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == f"{manifest.name}/test" and manifest.name != "folder" and len(ds.dataset.digest) == 8
    assert json.loads(ds.dataset.profile) == {"samples": manifest.num_samples, "classes": 6,
                                              "shards": len(manifest.shard_names), "skipped": 0}
    assert str(shards) in ds.dataset.source
    assert [(t.key, t.value) for t in ds.tags] == [("mlflow.data.context", "test")]


def test_queries_spread_over_as_many_classes_as_possible():
    keys = [f"k{i:02d}" for i in range(30)]
    labels = np.repeat(np.arange(3), 10)
    counts = np.bincount(labels[tracking.pick_queries(keys, labels, 8)], minlength=3)
    assert sorted(counts.tolist()) == [2, 3, 3]  # round-robin: no class twice before every class once
    few = tracking.pick_queries(keys[:12], np.array([0] * 10 + [1, 2]), 5)
    assert len(few) == 5 and len(set(few.tolist())) == 5 and {1, 2} <= set(np.array([0] * 10 + [1, 2])[few])


def test_recall_curve_zooms_to_the_data_and_grid_has_a_legend(tmp_path):
    from trainer.tracking import plots

    low, high = plots.recall_curve([(10, {1: 0.90, 2: 0.95, 4: 0.97}), (20, {1: 0.93, 2: 0.96, 4: 0.98})],
                                   str(tmp_path / "c.png"))
    assert 0.85 <= low < 0.90 and 0.98 < high <= 1.0
    rows = [{"key": "a", "label": 0, "neighbours": [("b", 0), ("c", 1)]}]
    plots.retrieval_grid(rows, {}, str(tmp_path / "g.png"), title="retrieval at step 28, epoch 2")
    with Image.open(tmp_path / "g.png") as grid:
        legend = {grid.getpixel((x, 28)) for x in range(0, grid.width)}
    assert {plots.QUERY, plots.GREEN, plots.RED} <= legend
