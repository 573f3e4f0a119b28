"""JPEG EXIF orientation is applied when shards are written and recorded in the manifest (issue 25, item 10): a
camera's portrait photo stored landscape with orientation 6 comes out of the shards upright."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageOps

from data_shards import write_dataset

pytestmark = pytest.mark.timeout(120)


def photo(path, orientation):
    """A 48x24 JPEG, left half dark, right half bright, with EXIF orientation `orientation`."""
    a = np.zeros((24, 48, 3), np.uint8)
    a[:, 24:] = 230
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, format="JPEG", quality=95, exif=exif.tobytes())


def shard_images(split_dir):
    out = {}
    for name in sorted(os.listdir(split_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(split_dir, name)) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for member, data in members.items():
                key, ext = member.split(".", 1)
                if ext in ("jpg", "png"):
                    meta = json.loads(members[f"{key}.json"])
                    out[meta["path"]] = Image.open(io.BytesIO(data)).convert("RGB")
    return out


def test_exif_orientation_is_applied_when_writing_and_recorded(tmp_path):
    src = tmp_path / "src"
    for cls in ("a", "b", "c", "d"):
        (src / cls).mkdir(parents=True)
        for i, orientation in enumerate((1, 6, 3, 8)):
            photo(src / cls / f"{i}.jpg", orientation)
    write_dataset("folder", str(src), str(tmp_path / "out"), train_classes=["a", "b"], test_classes=["c", "d"],
                  progress=False)
    for split in ("train", "test"):
        manifest = json.loads((tmp_path / "out" / split / "manifest.json").read_text())
        assert manifest["exif_orientation"] == "applied" and manifest["exif_rotated"] == 6  # 3 of 4, 2 classes
        for path, img in shard_images(tmp_path / "out" / split).items():
            with Image.open(src / path) as original:
                upright = ImageOps.exif_transpose(original).convert("RGB")
            assert img.size == upright.size, (path, img.size, upright.size)
            diff = np.abs(np.asarray(img, np.float64) - np.asarray(upright, np.float64)).mean()
            assert diff < 4.0, (path, diff)
    assert shard_images(tmp_path / "out" / "train")["a/1.jpg"].size == (24, 48)  # orientation 6: turned upright
