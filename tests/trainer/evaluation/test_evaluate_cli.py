"""`python -m trainer.evaluate CHECKPOINT --data SPLIT`: real shards (the scikit-learn digits), a checkpoint
dict as the trainer writes it, one process and two ranks over uneven shares, the embedding export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from data_shards import TransformConfig, eval_loader, read_manifest, write_dataset
from trainer import config
from trainer.demo import TEST_DIGITS, TRAIN_DIGITS, write_digit_folders
from trainer.distributed import free_port
from trainer.evaluation import evaluate
from trainer.evaluation.cli import main
from trainer.evaluation.export import FILES, load_export, write_table
from trainer.model import build_model

ROOT = Path(__file__).resolve().parents[3]  # the repository


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    write_digit_folders(str(tmp / "digits"))
    os.remove(next((tmp / "digits" / "9").iterdir()))  # 895 test images: two ranks cannot get equal shares
    write_dataset("folder", str(tmp / "digits"), str(tmp / "shards"), train_classes=TRAIN_DIGITS,
                  test_classes=TEST_DIGITS, shard_size="64KB", progress=False)
    cfg = config.load_config("demo", [f"data.root={tmp / 'shards'}", "eval.recall_ks=[1,4]"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp / "ckpt.pt"
    torch.save({"config": config.to_dict(cfg), "model": model.state_dict(), "epoch": 0}, path)
    split = str(tmp / "shards" / "test")
    loader = eval_loader(split, batch_size=100, num_workers=0,
                         transform=TransformConfig(**OmegaConf.to_container(cfg.data.transform)))
    expected = evaluate(model, loader, device="cpu", recall_ks=cfg.eval.recall_ks, nmi=cfg.eval.nmi,
                        map_r=cfg.eval.map_r, class_names=read_manifest(split).class_names)
    return tmp, path, split, expected


def printed_metrics(text: str) -> dict:
    start = text.index("{")
    return json.loads(text[start : text.index("}", start) + 1])


def test_cli_prints_metrics_and_exports(setup, capsys):
    tmp, ckpt, split, expected = setup
    out = tmp / "export"
    assert main([str(ckpt), "--data", split, "--num-workers", "0", "--export", str(out), "--faiss-index",
                 "--per-class", str(tmp / "per_class.parquet")]) == 0
    printed = printed_metrics(capsys.readouterr().out)
    assert printed["samples"] == read_manifest(split).num_samples == len(expected.keys)
    for name, value in expected.metrics.items():
        assert printed[name] == pytest.approx(value, abs=1e-6), name
    emb, keys, labels = load_export(out)
    assert keys == expected.keys and labels.tolist() == expected.labels.tolist()
    np.testing.assert_allclose(emb, expected.embeddings.numpy(), atol=1e-5)
    table = pd.read_parquet(tmp / "per_class.parquet")
    assert table["class_name"].tolist() == ["5", "6", "7", "8", "9"]
    import faiss

    index = faiss.read_index(str(out / FILES["index"]))
    assert index.ntotal == len(keys)
    _, nearest = index.search(emb[:5], 1)
    assert nearest[:, 0].tolist() == list(range(5))  # each vector finds itself


def test_cli_creates_the_folders_it_writes_into(setup, tmp_path, capsys):
    _, ckpt, split, expected = setup
    fresh = tmp_path / "fresh" / "out"  # neither folder exists
    assert main([str(ckpt), "--data", split, "--num-workers", "0", "--export", str(fresh),
                 "--per-class", str(fresh / "tables" / "x.parquet")]) == 0
    assert "export:" in capsys.readouterr().out
    assert load_export(fresh)[1] == expected.keys
    assert pd.read_parquet(fresh / "tables" / "x.parquet")["class_name"].tolist() == ["5", "6", "7", "8", "9"]


def test_cli_refuses_an_unwritable_output_before_evaluating(setup, tmp_path, capsys):
    _, ckpt, split, _ = setup
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(SystemExit) as e:
        main([str(ckpt), "--data", split, "--num-workers", "0", "--export", str(tmp_path / "file" / "out")])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "cannot create the output folder" in captured.err and "recall_at_1" not in captured.out
    with pytest.raises(SystemExit):
        main([str(ckpt), "--data", split, "--per-class", str(tmp_path / "table.xlsx")])
    assert ".csv or .parquet" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(setup, tmp_path, capsys):
    _, ckpt, split, _ = setup
    with pytest.raises(SystemExit):
        main([str(ckpt), "--data", split, "--faiss-index"])
    torch.save({"model": {}}, tmp_path / "bad.pt")
    assert main([str(tmp_path / "bad.pt"), "--data", split]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'bad.pt'}: not a trainer checkpoint" in err and "Traceback" not in err
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        write_table(setup[3].per_class, tmp_path / "table.xlsx")


@pytest.mark.distributed
def test_two_ranks_over_uneven_shards_count_every_sample_once(setup):
    tmp, ckpt, split, expected = setup
    shares = [eval_loader(split, batch_size=64, num_workers=1, rank=r, world_size=2).num_samples for r in (0, 1)]
    assert shares[0] != shares[1] and sum(shares) == len(expected.keys)  # the case under test: uneven
    out = tmp / "export2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "trainer.evaluate", str(ckpt), "--data", split,
           "--num-workers", "1", "--device", "cpu", "--export", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = printed_metrics(run.stdout)
    assert printed["samples"] == len(expected.keys)
    for name, value in expected.metrics.items():
        assert printed[name] == pytest.approx(value, abs=1e-6), name
    emb, keys, _ = load_export(out)
    assert keys == expected.keys and len(set(keys)) == len(keys)
    np.testing.assert_allclose(emb, expected.embeddings.numpy(), atol=1e-5)


def test_old_import_path_still_resolves_with_a_deprecation_warning():
    """`from trainer.evaluate import evaluate` (before the evaluation room) still works, and says where it moved."""
    import trainer.evaluate as old
    from trainer.evaluation import evaluate

    with pytest.warns(DeprecationWarning, match="trainer.evaluation.evaluate"):
        assert old.evaluate is evaluate
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018
