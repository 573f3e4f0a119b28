"""The documented path for one's own images, as a user types it: `data_shards write folder` on a tree of class
folders, then `python -m trainer --config folder` (offline and small here: a timm resnet18 without weights,
32 px, 3 steps), ending in a summary that names the dataset after its folder."""
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.trainer.test_trainer_loop import ROOT, clean_env


@pytest.mark.slow  # minutes on a loaded 2-core machine
@pytest.mark.timeout(600)
def test_a_folder_of_images_trains_with_the_folder_preset(tmp_path):
    src = tmp_path / "my_catalogue"
    for c in range(6):
        os.makedirs(src / f"class_{c}")
        for i in range(8):
            Image.new("RGB", (40, 40), ((c * 40) % 256, (i * 30) % 256, 90)).save(src / f"class_{c}" / f"{i}.jpg")
    env = clean_env()
    r = subprocess.run([sys.executable, "-m", "data_shards", "write", "folder", "--src", str(src), "--out",
                        str(tmp_path / "shards"), "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "trainer", "--config", "folder", f"data.root={tmp_path / 'shards'}",
                        "run.name=mine", f"run.output_dir={tmp_path / 'runs'}", "run.device=cpu",
                        "model.backbone=resnet18", "model.pretrained=false", "data.transform.image_size=32",
                        "data.transform.resize_size=36", "train.batch_size=8", "train.max_steps=3",
                        "data.num_workers=0", "tracking.enabled=false"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "on the my_catalogue shards" in out and "run mine" in out, out[-3000:]
