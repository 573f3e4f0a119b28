"""`loss.name`: ProxyGML or any pytorch-metric-learning loss, trained by the same trainer (tiny real digits shards)."""
import os
import subprocess
import sys

import pytest
import torch

from trainer import distributed
from trainer.build import build
from trainer.checkpoint import Checkpointer
from trainer.config import ConfigError, load_config

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def tiny(shards, out, *more):
    """8-channel CNN at 16 px, 2 epochs of 14 steps (the first one warm-up: head + loss weights only)."""
    return ["data.prepare=none", f"data.root={shards}", f"run.output_dir={out}", "run.name=t", "run.device=cpu",
            "data.num_workers=0", "model.small_cnn_width=8", "model.dim=16", "data.transform.image_size=16",
            "data.transform.resize_size=16", "train.epochs=2", "train.batch_size=64", "train.warmup_epochs=1",
            "optim.lr_milestones=[1]", "eval.every_epochs=1", "eval.nmi=false", "train.log_every_steps=5",
            "tracking.enabled=false", *more]


@pytest.mark.parametrize("overrides, key", [
    (["loss.name=NoSuchLoss"], "loss.name"),
    (["loss.name=ProxyAnchorLoss", "loss.kwargs.no_such_arg=1"], "loss.kwargs"),
    (["loss.name=MultiSimilarityLoss", "loss.miner=NoSuchMiner"], "loss.miner"),
    (["loss.name=TripletMarginLoss", "loss.miner=TripletMarginMiner", "loss.miner_kwargs.bogus=2"],
     "loss.miner_kwargs"),
    (["loss.name=ProxyAnchorLoss", "loss.mode=sharded"], "loss.mode"),
    (["loss.miner=MultiSimilarityMiner"], "loss.miner"),  # ProxyGML takes no miner
    (["loss.kwargs.margin=0.1"], "loss.kwargs"),
])
def test_bad_loss_choice_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["data.root=x", *overrides])
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_loss_choices_load():
    cfg = load_config("omniglot", ["data.root=x", "loss.name=MultiSimilarityLoss", "loss.miner=MultiSimilarityMiner",
                                   "loss.kwargs.alpha=2", "loss.kwargs.beta=50", "loss.miner_kwargs.epsilon=0.1"])
    assert cfg.loss.pml.kwargs == {"alpha": 2, "beta": 50} and cfg.loss.pml.miner_kwargs == {"epsilon": 0.1}
    assert load_config("demo", ["data.root=x"]).loss.family == "proxygml"


def test_cli_unknown_loss_fails_before_any_work(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    r = subprocess.run([sys.executable, "-m", "trainer", "--config", "demo", f"data.root={tmp_path}/d",
                        f"run.output_dir={tmp_path}/runs", "loss.name=ProxyAnchr"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "loss.name" in r.stderr and "ProxyAnchr" in r.stderr
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "d")


def test_baseline_loss_trains_with_warmup_and_proxy_lr(shards, tmp_path):
    cfg = load_config("demo", tiny(shards, tmp_path, "loss.name=ProxyAnchorLoss", "optim.proxy_lr=0.05",
                                   "loss.kwargs.margin=0.1", "loss.kwargs.alpha=32"))
    env = distributed.setup("cpu")
    try:
        trainer = build(cfg, env)
        groups = {g["name"]: g for g in trainer.optimizer.param_groups}
        proxies = trainer.criterion.loss_fn.proxies
        assert [id(p) for p in groups["proxies"]["params"]] == [id(proxies)]
        assert groups["proxies"]["lr"] == 0.05
        before = proxies.detach().clone()
        metrics = trainer.fit()
    finally:
        distributed.teardown()
        for k in DIST_VARS:
            os.environ.pop(k, None)
    assert 0.0 < metrics["recall_at_1"] <= 1.0 and metrics["map_at_r"] > 0.0
    state = Checkpointer(str(tmp_path / "t" / "checkpoints")).load_latest()
    assert (state["epoch"], state["step"]) == (2, 28)
    assert not torch.equal(state["criterion"]["loss_fn.proxies"], before)  # the proxies learned


@pytest.mark.distributed
def test_pair_based_loss_on_two_gloo_ranks(shards, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(distributed.free_port())]
    args = tiny(shards, tmp_path, "train.epochs=1", "train.warmup_epochs=0", "optim.lr_milestones=[5]",
                "loss.name=MultiSimilarityLoss", "loss.miner=MultiSimilarityMiner", "loss.mode=gather")
    r = subprocess.run(torchrun + ["-m", "trainer", "--config", "demo", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = Checkpointer(str(tmp_path / "t" / "checkpoints")).load_latest()
    assert (state["epoch"], state["step"], state["world_size"]) == (1, 14, 2)
    assert state["config"]["loss"]["pml"]["miner"] == "MultiSimilarityMiner"
    assert "recall_at_1" in r.stdout + r.stderr


# Losses that cannot run without arguments of their own or on (embeddings, labels) batches; each must be
# refused by the config with the reason, every other one must train.
NEEDS_ARGUMENTS = {"RankedListLoss": {"margin": 0.4, "Tn": 10}}  # listed with the loss.kwargs it needs
NEEDS_M_PER_CLASS = {"SmoothAPLoss"}  # refused with data.sampler=shuffle (the check's second step), trains with it


def one_step(cfg, num_classes=4):
    """One optimizer step of the trainer's own parts (model, criterion, optimizer) on a random 16 px batch;
    returns the loss and whether the embedder's weights moved."""
    from trainer.build import build_criterion, build_optimizer
    from trainer.engines import TrainModule
    from trainer.model import build_model

    torch.manual_seed(0)
    embedder = build_model(cfg.model)
    module = TrainModule(embedder, build_criterion(cfg.loss, num_classes, cfg.model.dim))
    optimizer = build_optimizer(cfg.optim, embedder, module.criterion)
    before = [p.detach().clone() for p in embedder.parameters()]
    loss = module(torch.randn(16, 3, 16, 16), torch.arange(num_classes).repeat_interleave(16 // num_classes))
    loss.backward()
    optimizer.step()
    return loss, any(not torch.equal(b, p) for b, p in zip(before, embedder.parameters()))


def test_every_listed_loss_trains_one_step():
    """What the loss.name error offers is what the check accepts: every listed loss trains (given the loss.kwargs
    the list names for it), every other class is refused with its reason."""
    from loss.baselines import UNSUITABLE, available_losses, loss_choices, required_kwargs

    base = ["data.root=x", "model.small_cnn_width=4", "model.dim=8"]
    trained = []
    for name in available_losses():
        assert required_kwargs(name) == list(NEEDS_ARGUMENTS.get(name, {})), name
        overrides = [*base, f"loss.name={name}",
                     *(f"loss.kwargs.{k}={v}" for k, v in NEEDS_ARGUMENTS.get(name, {}).items())]
        if name in NEEDS_M_PER_CLASS:
            with pytest.raises(ConfigError, match="^data.sampler: .*set data.sampler=m_per_class"):
                load_config("demo", overrides)
            overrides.append("data.sampler=m_per_class")
        cfg = load_config("demo", overrides)
        loss, moved = one_step(cfg)
        assert loss.dim() == 0 and torch.isfinite(loss) and moved, name
        trained.append(name)
    assert {"CosFaceLoss", "SubCenterArcFaceLoss", "P2SGradLoss", "ProxyAnchorLoss"} <= set(trained)
    assert len(trained) >= 30 and "RankedListLoss (with loss.kwargs margin, Tn)" in loss_choices()
    for name, why in UNSUITABLE.items():
        assert name not in loss_choices().replace("'proxygml'", "").split(", ")
        with pytest.raises(ConfigError) as e:
            load_config("demo", [*base, f"loss.name={name}"])
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"loss.name: {name} cannot be trained here ({why})"), msg
    with pytest.raises(ConfigError, match="^loss.kwargs: RankedListLoss rejects"):
        load_config("demo", [*base, "loss.name=RankedListLoss"])


def test_star_kwargs_loss_gets_its_sizes_and_trains_in_the_trainer(shards, tmp_path):
    """CosFaceLoss(*args, **kwargs) takes num_classes and embedding_size through its parent's constructor."""
    cfg = load_config("demo", tiny(shards, tmp_path, "loss.name=CosFaceLoss", "train.max_steps=3"))
    env = distributed.setup("cpu")
    try:
        trainer = build(cfg, env)
        assert trainer.criterion.loss_fn.W.shape == (16, 5)  # embedding_size x the 5 train classes
        trainer.fit()
    finally:
        distributed.teardown()
        for k in DIST_VARS:
            os.environ.pop(k, None)
    assert Checkpointer(str(tmp_path / "t" / "checkpoints")).load_latest()["step"] == 3
