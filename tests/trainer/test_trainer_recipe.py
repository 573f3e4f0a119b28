"""The authors' recipe switches: BN in eval mode with learning affines, nn.Linear's own init of the embedding
layer, the warm-up epoch (backbone frozen only then); and the config keys that choose them."""
import math

import pytest
import torch

from tests.trainer.test_trainer_loop import final_weights, run_in_process, run_warmup_epoch, tiny
from trainer.config import ConfigError, load_config
from trainer.model import build_model


def model_cfg(*overrides):
    return load_config("demo", list(overrides)).model


@pytest.mark.timeout(60)
def test_bn_affines_learn_while_running_statistics_stay():
    model = build_model(model_cfg("model.freeze_bn=true", "model.freeze_bn_affine=false")).train()
    bn = model.backbone[1]
    assert not bn.training and bn.weight.requires_grad and any(p is bn.weight for p in model.backbone_parameters())
    mean, weight = bn.running_mean.clone(), bn.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    (model(torch.randn(4, 3, 32, 32) * 5 + 3) * torch.randn(4, 64)).sum().backward()  # (unit rows: not .pow(2))
    opt.step()
    torch.testing.assert_close(bn.running_mean, mean)
    assert not torch.equal(bn.weight, weight)
    ours = build_model(model_cfg("model.freeze_bn=true")).train()  # the default: the affines are frozen too
    assert not ours.backbone[1].training and not ours.backbone[1].weight.requires_grad
    plain = build_model(model_cfg("model.freeze_bn=false", "model.freeze_bn_affine=false")).train()
    assert plain.backbone[1].training


@pytest.mark.timeout(60)
def test_embedding_init_choice():
    torch.manual_seed(0)
    ours = build_model(model_cfg()).embedding
    assert torch.count_nonzero(ours.bias) == 0
    torch.testing.assert_close(ours.weight.std(), torch.tensor(math.sqrt(2 / ours.out_features)), rtol=0.1, atol=0)
    torch.manual_seed(0)
    theirs = build_model(model_cfg("model.embedding_init=torch_default")).embedding
    bound = 1 / math.sqrt(theirs.in_features)  # nn.Linear: U(±1/sqrt(fan_in)) for the weight and the bias
    assert theirs.weight.abs().max() <= bound and theirs.bias.abs().max() <= bound
    assert torch.count_nonzero(theirs.bias) == theirs.out_features
    assert theirs.weight.abs().max() > 0.9 * bound
    with pytest.raises(ConfigError, match="model.embedding_init"):
        load_config("demo", ["model.embedding_init=xavier"])


@pytest.mark.timeout(300)
def test_warmup_freezes_the_backbone_for_the_warmup_epoch_only(shards, tmp_path):
    """The authors' recipe end to end: after the warm-up epoch (14 steps) the backbone, BN affines included, is
    unchanged and the head moved; after the second epoch the convolutions and BN affines moved, the BN running
    statistics never did."""
    keys = ["model.freeze_bn=true", "model.freeze_bn_affine=false", "model.embedding_init=torch_default"]
    initial, state = run_warmup_epoch(shards, tmp_path, *keys)
    for k, v in initial.items():
        if k.startswith("backbone."):
            torch.testing.assert_close(state["model"][k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(state["model"]["embedding.weight"], initial["embedding.weight"])
    run_in_process(tiny(shards, tmp_path, *keys))  # resumes and trains the second epoch
    state, _ = final_weights(tmp_path / "t")
    assert state["epoch"] == 2
    for k, v in initial.items():
        if k.startswith("backbone.") and ("running" in k or "num_batches" in k):
            torch.testing.assert_close(state["model"][k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(state["model"]["backbone.0.weight"], initial["backbone.0.weight"])  # conv
    assert not torch.equal(state["model"]["backbone.1.weight"], initial["backbone.1.weight"])  # BN affine


@pytest.mark.timeout(60)
@pytest.mark.parametrize("preset", ["cub200", "cars196"])
def test_cub_and_cars_presets_are_the_authors_recipe_exactly(preset):
    cfg = load_config(preset)
    assert (cfg.model.freeze_bn, cfg.model.freeze_bn_affine, cfg.model.embedding_init, cfg.train.warmup_epochs,
            cfg.loss.proxygml.proxies_per_class, cfg.loss.proxygml.r, cfg.loss.proxygml.lam, cfg.loss.proxygml.scale,
            cfg.data.sampler) == \
        (True, False, "torch_default", 1, 12, 0.05, 0.3, 1.0, "shuffle")
