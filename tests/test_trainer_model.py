"""The embedder: shapes, unit norm, frozen BN, warm-up switch, local weights file, bninception error."""
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
    with pytest.raises(FileNotFoundError, match="model.weights_file"):
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


def test_bninception_names_the_missing_package():
    try:
        import pretrainedmodels  # noqa: F401
        pytest.skip("pretrainedmodels is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pretrainedmodels"):
        build_model(model_cfg("model.backbone=bninception"))
