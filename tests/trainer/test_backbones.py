"""timm backbones give timm's own feature (forward_head(pre_logits=True)) under our embedding head; the backbones
that were right before give the same features as before; a ViT at 160 px trains a step with layer-wise lr decay;
BN-Inception is the paper's network (tiny random timm models, no network)."""
import pytest
import timm
import torch
from timm.layers import SelectAdaptivePool2d

from trainer.config import ConfigError, load_config
from trainer.model import build_model

# name, backbone_kwargs (tiny), image size, pooling
TINY = {
    "vit_cls": ("vit_tiny_patch16_224", {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32,
                                         "patch_size": 8}, 32),
    "vit_reg": ("vit_small_patch14_reg4_dinov2", {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28},
                28),
    "swin": ("swin_tiny_patch4_window7_224", {"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2),
                                              "img_size": 56}, 56),
    "convnext": ("convnext_atto", {"dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1)}, 64),
    "resnet": ("resnet18", {"layers": [1, 1, 1, 1]}, 64),
}
CASES = [("vit_cls", "token"), ("vit_cls", "avg"), ("vit_reg", "token"), ("vit_reg", "avg"), ("swin", "avg"),
         ("convnext", "avg"), ("resnet", "avg"), ("resnet", "catavgmax")]


def kwargs_text(kwargs: dict) -> str:
    return "{" + ", ".join(f"{k}: {list(v) if isinstance(v, tuple) else v}" for k, v in kwargs.items()) + "}"


def model_cfg(name, kwargs, size, *more):
    return load_config("demo", [f"model.backbone={name}", f"model.backbone_kwargs={kwargs_text(kwargs)}",
                                f"data.transform.image_size={size}", f"data.transform.resize_size={size}",
                                "model.pretrained=false", "model.dim=8", *more]).model


@pytest.mark.parametrize("case, pooling", CASES)
def test_feature_is_timms_pre_logits(case, pooling):
    """Our backbone's feature equals timm's forward_head(forward_features(x), pre_logits=True) of the same network
    built with its classifier (float64), and the embedding head takes exactly that width."""
    name, kwargs, size = TINY[case]
    torch.manual_seed(0)
    model = build_model(model_cfg(name, kwargs, size, f"model.pooling={pooling}")).double().eval()
    reference = timm.create_model(name, pretrained=False, global_pool=pooling, **kwargs).double().eval()
    missing, unexpected = reference.load_state_dict(model.backbone.net.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(reference.pretrained_cfg["classifier"]) for k in missing)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        want = reference.forward_head(reference.forward_features(x), pre_logits=True)
        got = model.backbone(x)
        emb = model(x)
    assert got.shape == want.shape and model.embedding.in_features == want.shape[1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert emb.shape == (3, 8)


def test_vit_token_and_avg_features_differ_as_timm_defines():
    """token: the class token after the final norm; avg: the mean of the patch tokens (registers and the class
    token excluded) after fc_norm: two different features of the same network."""
    name, kwargs, size = TINY["vit_reg"]
    torch.manual_seed(0)
    tok = build_model(model_cfg(name, kwargs, size, "model.pooling=token")).double().eval()
    avg = build_model(model_cfg(name, kwargs, size, "model.pooling=avg")).double().eval()
    assert type(tok.backbone.net.fc_norm).__name__ == "Identity" and hasattr(avg.backbone.net.fc_norm, "weight")
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        tokens = avg.backbone.net.forward_features(x)  # (B, 1 + 4 registers + patches, C), before fc_norm
        want = avg.backbone.net.fc_norm(tokens[:, avg.backbone.net.num_prefix_tokens:].mean(dim=1))
        torch.testing.assert_close(avg.backbone(x), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, kwargs, pooling", [
    ("resnet18", {"layers": [1, 1, 1, 1]}, "avg"), ("resnet18", {"layers": [1, 1, 1, 1]}, "catavgmax"),
    ("tf_efficientnet_lite0", {}, "avg")])
def test_cnn_features_are_the_same_as_before(name, kwargs, pooling):
    """The CNN path before this change: forward_features, then SelectAdaptivePool2d(pooling, flatten). Same numbers."""
    torch.manual_seed(0)
    model = build_model(model_cfg(name, kwargs, 64, f"model.pooling={pooling}")).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        before = SelectAdaptivePool2d(pool_type=pooling, flatten=True)(model.backbone.net.forward_features(x))
        torch.testing.assert_close(model.backbone(x), before, rtol=0, atol=0)


def test_gem_pools_a_cnn_map_and_an_nhwc_map_and_refuses_tokens():
    name, kwargs, size = TINY["swin"]
    torch.manual_seed(0)
    model = build_model(model_cfg(name, kwargs, size, "model.pooling=gem")).double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        fmap = model.backbone.net.forward_features(x)  # (B, H, W, C): Swin is NHWC
        want = fmap.clamp(min=1e-6).pow(3).mean(dim=(1, 2)).pow(1 / 3)
        torch.testing.assert_close(model.pool(model.backbone(x)), want)
    name, kwargs, size = TINY["vit_cls"]
    with pytest.raises(ConfigError, match="model.pooling: gem pools a feature map"):
        model_cfg(name, kwargs, size, "model.pooling=gem")


def test_input_size_is_checked_at_config_time_and_backbone_kwargs_reach_timm():
    with pytest.raises(ConfigError, match=r"data.transform.image_size: 160 px does not fit .*img_size: 160"):
        load_config("demo", ["model.backbone=vit_small_patch16_224", "data.transform.image_size=160",
                             "data.transform.resize_size=160", "model.pretrained=false"])
    with pytest.raises(ConfigError, match="model.pooling: resnet18 does not take 'token'"):
        load_config("demo", ["model.backbone=resnet18", "model.pooling=token"])
    with pytest.raises(ConfigError, match="model.backbone_kwargs: timm cannot build resnet18"):
        load_config("demo", ["model.backbone=resnet18", "model.backbone_kwargs={no_such_arg: 1}"])
    with pytest.raises(ConfigError, match="model.backbone_kwargs: only for timm backbones"):
        load_config("demo", ["model.backbone_kwargs={img_size: 32}"])
    cfg = model_cfg("vit_small_patch16_224", {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 48,
                                              "drop_path_rate": 0.2}, 48)
    net = build_model(cfg).backbone.net
    assert net.patch_embed.img_size == (48, 48) and net.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


def test_auto_mean_std_interpolation_come_from_the_pretrained_config():
    cfg = load_config("demo", ["model.backbone=vit_small_patch16_224.augreg_in21k_ft_in1k",
                               "data.transform.image_size=224", "data.transform.resize_size=256",
                               "data.transform.mean=auto", "data.transform.std=auto",
                               "data.transform.interpolation=auto"])
    pcfg = timm.models.get_pretrained_cfg("vit_small_patch16_224.augreg_in21k_ft_in1k")
    t = cfg.data.transform
    assert list(t.mean) == list(pcfg.mean) and list(t.std) == list(pcfg.std) and t.interpolation == "bicubic"
    cfg = load_config("cub200", ["data.root=x", "data.transform.mean=auto"])
    assert list(cfg.data.transform.mean) == [104.0, 117.0, 128.0]


@pytest.mark.timeout(120)
def test_vit_at_160px_trains_a_step_with_layer_decay():
    from loss import ProxyGML
    from trainer.build import build_optimizer
    cfg = load_config("demo", ["model.backbone=vit_small_patch16_224", "model.pretrained=false",
                               "model.backbone_kwargs={embed_dim: 32, depth: 3, num_heads: 2, img_size: 160}",
                               "data.transform.image_size=160", "data.transform.resize_size=160",
                               "model.pooling=token", "optim.name=adamw", "optim.layer_decay=0.5", "optim.eps=1e-8",
                               "model.dim=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    crit = ProxyGML(num_classes=4, dim=8, proxies_per_class=1, r=0.5)
    opt = build_optimizer(cfg.optim, model, crit)
    backbone = [g for g in opt.param_groups if g["name"] == "backbone"]
    scales = sorted({g["lr_scale"] for g in backbone})
    assert len(scales) >= 4 and scales == pytest.approx([0.5 ** k for k in range(len(scales))][::-1])
    assert all(g["lr"] == pytest.approx(cfg.optim.lr * g["lr_scale"]) for g in backbone)
    assert {g["weight_decay"] for g in backbone} == {0.0, cfg.optim.weight_decay}  # norms and biases: none
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters())) + len(list(crit.parameters()))
    before = model.backbone.net.pos_embed.detach().clone()
    loss = crit(model(torch.randn(8, 3, 160, 160)), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and model.backbone.net.pos_embed.grad.abs().sum() > 0
    assert not torch.equal(before, model.backbone.net.pos_embed)


def test_layer_decay_lrs_survive_apply_optim_hyperparameters():
    from loss import ProxyGML
    from trainer.build import build_optimizer
    from trainer.resume import apply_optim_hyperparameters
    name, kwargs, size = TINY["vit_cls"]
    cfg = load_config("demo", [f"model.backbone={name}", f"model.backbone_kwargs={kwargs_text(kwargs)}",
                               f"data.transform.image_size={size}", "model.pretrained=false", "optim.layer_decay=0.7"])
    model = build_model(cfg.model)
    opt = build_optimizer(cfg.optim, model, ProxyGML(num_classes=2, dim=cfg.model.dim))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.optim.lr_milestones), cfg.optim.lr_gamma)
    lrs = [g["lr"] for g in opt.param_groups]
    apply_optim_hyperparameters(opt, sched, cfg.optim)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(lrs)


def test_bninception_is_the_papers_network():
    """The feature map of pretrained-models.pytorch's BNInception (when that package is importable) with the same
    weights; its state dict has the file's names and shapes (the classifier aside)."""
    try:
        from pretrainedmodels.models.bninception import BNInception as Reference
    except ImportError:
        pytest.skip("pretrainedmodels (the reference implementation) is not installed")
    from trainer.bninception import BNInception
    torch.manual_seed(0)
    ref, ours = Reference(), BNInception()
    sd = ref.state_dict()
    for k in sd:
        if k.endswith("running_mean"):
            sd[k] = torch.randn_like(sd[k]) * 0.1
        if k.endswith("running_var"):
            sd[k] = torch.rand_like(sd[k]) + 0.5
    ref.load_state_dict(sd)
    ours.load_state_dict({k: v for k, v in sd.items() if not k.startswith("last_linear.")})
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval().features(x))


def test_bninception_shapes():
    from trainer.bninception import BNInception
    net = BNInception().eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 1024, 7, 7)
    assert sum(1 for k in net.state_dict() if k.endswith(".running_var")) == 69  # conv-BN pairs


def test_batch_norm_warning_names_the_keys_and_sync_bn_needs_gpus():
    """The start-up rule of trainer.build.batch_norm_setup: BatchNorm training on < 16 images per statistic warns
    (naming train.batch_size, model.sync_bn, model.freeze_bn); frozen BN or LayerNorm does not; model.sync_bn on
    CPU ranks is refused in one line; on one rank there is nothing to synchronise."""
    from trainer.build import batch_norm_setup
    from trainer.distributed import DistEnv
    cpu8 = DistEnv(rank=0, world_size=8, local_rank=0, device=torch.device("cpu"))
    one = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    def lines(cfg, env, per_rank):
        said = []
        batch_norm_setup(cfg, env, build_model(cfg.model), per_rank, said.append)
        return said

    sop = load_config("sop", ["data.root=x", "model.backbone=resnet18", "model.pretrained=false",
                              "model.pooling=avg"])
    said = lines(sop, cpu8, 4)
    assert len(said) == 1 and said[0].startswith("warning: BatchNorm trains on 4 images per rank "
                                                 "(train.batch_size=32 over 8 ranks)")
    assert all(k in said[0] for k in ("model.sync_bn=true", "model.freeze_bn=true", "train.batch_size"))
    assert lines(sop, one, 32) == []
    frozen = load_config("cub200", ["data.root=x", "model.backbone=resnet18", "model.pretrained=false"])
    assert lines(frozen, cpu8, 4) == []
    vit = load_config("demo", ["model.backbone=vit_tiny_patch16_224", "model.pretrained=false",
                               "model.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2, img_size: 32}"])
    assert lines(vit, cpu8, 4) == []
    synced = load_config("sop", ["data.root=x", "model.backbone=resnet18", "model.pretrained=false",
                                 "model.sync_bn=true"])
    with pytest.raises(ConfigError, match="model.sync_bn: SyncBatchNorm needs CUDA devices"):
        lines(synced, cpu8, 4)
    assert lines(synced, one, 32) == []
