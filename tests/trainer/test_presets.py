"""Every preset builds and takes a step from a weights file made here, with no network; `python -m trainer --config
cub200` offline without weights ends in one line naming how to get them, with them it trains (and says which file
it loaded, in the log and in MLflow), with a mismatched file it stops in one line before training."""
import os
import subprocess
import sys

import pytest
import timm
import torch

from trainer.build import build_criterion, build_optimizer
from trainer.config import load_config
from trainer.model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESETS = ["cub200", "cars196", "sop", "cub200_vit_s16"]


def weights_file(backbone: str, path) -> str:
    """A file of the published form for `backbone`, random values (as the fetch command writes: with classifier)."""
    torch.manual_seed(0)
    if backbone == "bninception":
        from trainer.bninception import BNInception
        sd = dict(BNInception().state_dict())
        sd["last_linear.weight"], sd["last_linear.bias"] = torch.randn(1000, 1024) * 0.01, torch.zeros(1000)
    else:
        sd = timm.create_model(backbone, pretrained=False).state_dict()
    torch.save(sd, path)
    return str(path)


@pytest.mark.slow  # full-size BN-Inception / ViT-S steps at 224 px: about 20 s each on 2 CPU cores
@pytest.mark.timeout(240)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_builds_and_steps_from_a_weights_file(preset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = load_config(preset, ["data.root=x"]).model.backbone
    cfg = load_config(preset, ["data.root=x", f"model.weights_file={weights_file(backbone, tmp_path / 'w.pth')}"])
    size = cfg.data.transform.image_size
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    assert model.loaded is not None and "all" in model.loaded.describe()
    crit = build_criterion(cfg.loss, 4, cfg.model.dim)
    opt = build_optimizer(cfg.optim, model, crit)
    images, labels = torch.randn(4, 3, size, size) * 50, torch.tensor([0, 1, 2, 3])
    loss = crit(model(images), labels)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def cli(*args, env_extra=None, timeout=200):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2", **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


@pytest.mark.slow  # three runs of the cub200 preset (BN-Inception): about 80 s on 2 CPU cores
@pytest.mark.timeout(400)
def test_cub200_offline_first_job(shards, tmp_path):
    """The first real job: no network, no weights -> one line, exit 2; a mismatched file -> one line, exit 2, no
    training; the right file -> it trains a step and says which file it loaded (log, summary, MLflow)."""
    offline = {"HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")}
    common = ["--config", "cub200", f"data.root={shards}", f"run.output_dir={tmp_path / 'runs'}",
              "data.num_workers=0", "run.device=cpu"]
    p = cli(*common, env_extra=offline)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "python -m trainer.weights fetch bninception --out bninception.pth" in p.stderr
    assert "model.weights_file=bninception.pth" in p.stderr

    wrong = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), wrong)
    p = cli(*common, f"model.weights_file={wrong}", env_extra=offline)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"error: model.weights_file: {wrong} does not fit bninception: 0 of ")
    assert not os.path.exists(tmp_path / "runs" / "cub200" / "checkpoints")

    good = weights_file("bninception", tmp_path / "bninception.pth")
    p = cli(*common, f"model.weights_file={good}", "train.batch_size=8", "train.max_steps=1",
            "data.transform.image_size=96", "data.transform.resize_size=96", env_extra=offline)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    from trainer.bninception import BNInception
    n = sum(1 for k in BNInception().state_dict() if not k.endswith("num_batches_tracked"))
    assert f"  weights {good}: all {n} backbone tensors matched, 2 unused (last_linear.weight, last_linear.bias)" in out
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.search_runs(client.get_experiment_by_name("proxygml").experiment_id)[0]
    assert run.data.params["weights.loaded"].startswith(f"{good}: all ")
    assert run.data.params["model.weights_file"] == good
