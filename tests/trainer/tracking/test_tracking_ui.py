"""What the MLflow 3.17 UI shows of a training run, read through MLflow's API (the same data the UI reads; checked
once in a headless Chromium): the link the summary prints opens the model-training view of the experiment's runs
with Recall@1, MAP@R and the training loss as the first columns; the training loss's chart section comes first;
per-class tables lead with class_name, recall_at_1, map_at_r; datasets carry their own name; the source is the
command and the git commit."""
import csv
import json
import os
import re
import shutil
import subprocess

import mlflow
import pytest

from data_shards import read_manifest, write_dataset
from tests.trainer.test_trainer_summary import ROOT, run_trainer
from trainer.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, RUNS_VIEW_KEY, RUNS_VIEW_TAG

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def tracked(shards, tmp_path_factory):
    """One short tracked run on the digits shards: (summary text, client, experiment, run)."""
    out = tmp_path_factory.mktemp("ui")
    text = run_trainer(shards, out, "train.epochs=1")
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("proxygml")
    (run,) = client.search_runs([experiment.experiment_id])
    return text, client, experiment, run


def test_the_printed_link_opens_the_training_runs_with_their_metrics_first(tracked):
    text, client, experiment, run = tracked
    url = re.search(r"then open +(\S+)", text).group(1)
    assert url == (f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
                   f"?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW_KEY}")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    view = json.loads(experiment.tags[RUNS_VIEW_TAG])
    first = ["metrics.`eval/recall_at_1`", "metrics.`eval/map_at_r`", "metrics.`Train/loss`"]
    assert view["columnOrder"][:3] == first and set(first) <= set(view["selectedColumns"])
    for column in first:  # every metric column of the view has a value in the run
        assert column[len("metrics.`"):-1] in run.data.metrics, column


def test_the_training_loss_chart_comes_first(tracked):
    _, _, _, run = tracked
    keys = sorted(run.data.metrics)  # the run page: sections by prefix, in byte order; charts by name inside
    sections = sorted({k.rsplit("/", 1)[0] if "/" in k else "\x7f" for k in keys})  # unprefixed: "Model metrics"
    assert sections[0] == "Train"
    assert sorted(k for k in keys if k.startswith("Train/"))[0] == "Train/loss"
    assert {"Train/loss", "Train/loss_s", "Train/loss_p"} <= set(keys) and "loss" not in keys


def test_per_class_tables_lead_with_name_recall_and_map(tracked):
    _, client, _, run = tracked
    folder = "evaluations/step-000000014"
    local = client.download_artifacts(run.info.run_id, f"{folder}/per_class_recall.csv")
    with open(local, newline="") as f:
        header = next(csv.reader(f))
    assert header[:3] == ["class_name", "recall_at_1", "map_at_r"], header
    local = client.download_artifacts(run.info.run_id, f"{folder}/worst_classes.csv")
    with open(local, newline="") as f:
        assert next(csv.reader(f))[:3] == ["class_name", "recall_at_1", "map_at_r"]


def test_datasets_are_named_for_their_source_and_the_source_is_the_command(tracked):
    _, _, _, run = tracked
    names = sorted(d.dataset.name for d in run.inputs.dataset_inputs)
    assert names == ["digits/test", "digits/train"]
    tags = run.data.tags
    assert tags["mlflow.source.type"] == "JOB"  # the UI shows a JOB's source name whole
    assert tags["mlflow.source.name"].startswith("python -m trainer --config demo data.prepare=none")
    if shutil.which("git") and os.path.exists(os.path.join(ROOT, ".git")):  # a checkout (a worktree's .git is a file)
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert tags["mlflow.source.git.commit"] == head


def test_a_folder_dataset_is_named_after_its_folder_or_its_name(tmp_path):
    from PIL import Image

    src = tmp_path / "birds"
    for c in ("a", "b", "c", "d"):
        os.makedirs(src / c)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(src / c / f"{i}.png")
    write_dataset("folder", src, tmp_path / "out", progress=False)
    assert read_manifest(tmp_path / "out" / "train").name == "birds"
    write_dataset("folder", str(src) + "/", tmp_path / "named", progress=False, name="cub-mini")
    assert read_manifest(tmp_path / "named" / "test").name == "cub-mini"
    assert read_manifest(tmp_path / "named" / "test").dataset == "folder"  # the format stays the format
