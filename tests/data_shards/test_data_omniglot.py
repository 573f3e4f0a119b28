"""Omniglot (real handwritten characters, 1-bit PNGs) as a class-folder tree written by
../shared/data/omniglot/export.py, converted by the folder writer and read back as 3-channel images."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_shards import TransformConfig, eval_loader, read_manifest, train_loader, write_dataset
from data_shards.transforms import decode_image
from tests.data_shards.test_data_layouts import REPO, read_split

OMNIGLOT = os.path.join(REPO, "..", "shared", "data", "omniglot")
EXPORT = os.path.join(OMNIGLOT, "export.py")
pytestmark = pytest.mark.skipif(not os.path.isfile(EXPORT), reason=f"{EXPORT} not present")


def export_classes(out: str, class_ids: list[int]) -> None:
    """export.py's own naming and PNG writing, for a few classes (the full export is the slow test)."""
    spec = importlib.util.spec_from_file_location("omniglot_export", EXPORT)
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    background = np.load(os.path.join(OMNIGLOT, "images_background.npz"))["images"]
    evaluation = np.load(os.path.join(OMNIGLOT, "images_evaluation.npz"))["images"]
    images = np.concatenate([background, evaluation])
    for cid in class_ids:
        folder = os.path.join(out, export.class_name(cid))
        os.makedirs(folder, exist_ok=True)
        for drawer in range(20):
            Image.fromarray(images[cid - 1, drawer]).save(os.path.join(folder, f"{cid:04d}_{drawer + 1:02d}.png"))


def test_omniglot_classes_convert_and_stream(tmp_path):
    src = str(tmp_path / "omniglot")
    export_classes(src, [1, 2, 3, 965, 966, 967])
    summary = write_dataset("folder", src, tmp_path / "out", train_fraction=0.5, shard_size="20kB", progress=False)
    assert summary["train"]["num_samples"] == summary["test"]["num_samples"] == 60
    m = read_manifest(tmp_path / "out" / "test")
    assert m.class_names == ["0965_Angelic_character01", "0966_Angelic_character02", "0967_Angelic_character03"]
    assert m.class_ids == [3, 4, 5] and len(m.shards) > 1
    s = read_split(str(tmp_path / "out" / "train"))[0]
    with Image.open(os.path.join(src, json.loads(s["json"])["path"])) as original:
        assert original.mode == "1"
    img = np.asarray(decode_image(s["png"]))
    assert img.shape == (105, 105, 3) and set(np.unique(img)) <= {0, 255}
    tf = TransformConfig(image_size=32, resize_size=36)
    x, y = next(iter(train_loader(tmp_path / "out" / "train", batch_size=16, num_workers=2, transform=tf)))
    assert x.shape == (16, 3, 32, 32) and y.max() < 3
    keys = [k for _, _, ks in eval_loader(tmp_path / "out" / "test", batch_size=16, transform=tf) for k in ks]
    assert len(keys) == len(set(keys)) == 60


@pytest.mark.slow
def test_full_omniglot_export_and_conversion(tmp_path):
    src = tmp_path / "omniglot"
    subprocess.run([sys.executable, EXPORT, str(src)], check=True, timeout=600)
    summary = write_dataset("folder", src, tmp_path / "out", train_fraction=811 / 1623, shard_size="4MB",
                            progress=False)
    assert (summary["train"]["num_classes"], summary["test"]["num_classes"]) == (811, 812)
    assert (summary["train"]["num_samples"], summary["test"]["num_samples"]) == (16220, 16240)
    assert summary["train"]["skipped"] == summary["test"]["skipped"] == 0
    keys = [k for _, _, ks in eval_loader(tmp_path / "out" / "test", batch_size=512, num_workers=2,
                                          transform=TransformConfig(image_size=28, resize_size=28)) for k in ks]
    assert len(set(keys)) == len(keys) == 16240
