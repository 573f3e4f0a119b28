"""The embedder: shapes, unit norm, frozen BN, warm-up switch, local weights file."""
import pytest
import torch

from trainer.config import load_config
from trainer.model import build_model


def model_cfg(*overrides):
    return load_config("demo", list(overrides)).model


def test_small_cnn_embeds_unit_vectors():
    model = build_model(model_cfg("model.dim=16"))
    emb = model(torch.randn(5, 3, 32, 32))
    assert emb.shape == (5, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))


@pytest.mark.parametrize("pooling, mult", [("avg", 1), ("catavgmax", 2)])
def test_timm_backbone_and_pooling(pooling, mult):
    cfg = model_cfg("model.backbone=resnet18", "model.pretrained=false", f"model.pooling={pooling}", "model.dim=8")
    model = build_model(cfg)
    assert model.embedding.in_features == 512 * mult
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 8)


def test_local_weights_file_is_loaded(tmp_path):
    import timm
    src = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    cfg = model_cfg("model.backbone=resnet18", "model.pretrained=true", f"model.weights_file={path}")
    model = build_model(cfg)
    torch.testing.assert_close(model.backbone.net.conv1.weight, src.conv1.weight)
    from trainer.weights import WeightsError
    with pytest.raises(WeightsError, match="model.weights_file: no file"):
        build_model(model_cfg("model.backbone=resnet18", "model.pretrained=true", "model.weights_file=/no/file"))


def test_frozen_bn_keeps_statistics_and_affines():
    model = build_model(model_cfg("model.freeze_bn=true")).train()
    bn = model.backbone[1]
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    torch.testing.assert_close(bn.running_mean, before)
    assert not bn.weight.requires_grad and all(p is not bn.weight for p in model.backbone_parameters())


def test_warmup_switch_freezes_only_the_backbone():
    model = build_model(model_cfg("model.freeze_bn=true"))
    model.set_backbone_trainable(False)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head_parameters())
    model.set_backbone_trainable(True)
    assert not model.backbone[1].weight.requires_grad  # frozen BN stays frozen
    assert model.backbone[0].weight.requires_grad


@pytest.mark.timeout(120)
def test_compile_covers_the_training_forward_only_and_keeps_parameter_names():
    """train.compile: one graph for the training forward (same shape every step); the embedder called directly
    (evaluation) stays eager; checkpoint names do not change; the loss is the eager loss."""
    import torch._dynamo

    from loss import ProxyGML
    from trainer.engines import TrainModule
    torch.manual_seed(0)
    embedder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
    crit = ProxyGML(num_classes=3, dim=8, proxies_per_class=2, r=0.5)
    eager, compiled = TrainModule(embedder, crit), TrainModule(embedder, crit, compile=True)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for _ in range(2):
        torch.testing.assert_close(compiled(x, y), eager(x, y), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        embedder(x[:5])  # evaluation: another batch size, no grad, eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
