"""Tiny but real copies of the official dataset layouts (generated JPEGs, the exact index-file formats, a
real cars_annos.mat written by scipy), converted by the writers; also used by the stream tests."""

import io
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import scipy.io
from PIL import Image

from data_shards import DamagedShard, read_manifest, write_dataset
from data_shards.__main__ import main as cli_main
from data_shards.manifest import sha256_file
from data_shards.transforms import decode_image

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository


def jpeg(rng, cls: int, size=(28, 36)) -> bytes:
    """A small real JPEG whose mean colour depends on the class."""
    base = np.array([(cls * 37) % 256, (cls * 91) % 256, (cls * 53) % 256], dtype=np.int16)
    img = np.clip(base + rng.integers(-40, 40, size + (3,)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=90)
    return out.getvalue()


def save(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def make_cub(root: str, per_class: int = 2, seed: int = 0) -> str:
    """CUB_200_2011/ with all 200 classes, `per_class` images each, and its three index files."""
    rng = np.random.default_rng(seed)
    cub = os.path.join(root, "CUB_200_2011")
    images, labels, classes = [], [], []
    for cid in range(1, 201):
        folder = f"{cid:03d}.Bird_{cid}"
        classes.append(f"{cid} {folder}")
        for k in range(per_class):
            rel = f"{folder}/Bird_{cid}_{k:04d}_{cid * 7 + k}.jpg"
            save(os.path.join(cub, "images", rel), jpeg(rng, cid, (20 + k, 24)))
            images.append(f"{len(images) + 1} {rel}")
            labels.append(f"{len(labels) + 1} {cid}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("classes.txt", classes)):
        with open(os.path.join(cub, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return cub


def make_cars(root: str, per_class: int = 1, seed: int = 1) -> str:
    """car_ims/ + cars_annos.mat in the structure of the real file (1 x N struct array, 1 x 196 names)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "car_ims"))
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    rows = []
    for cid in range(1, 197):
        for k in range(per_class):
            rel = f"car_ims/{len(rows) + 1:06d}.jpg"
            save(os.path.join(root, rel), jpeg(rng, cid, (24, 30 + k)))
            rows.append((rel, 1 + k, 2, 20, 18, cid, (cid + k) % 2))
    ann = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        for f, v in zip(fields, row):
            ann[0, i][f] = np.array([v]) if isinstance(v, str) else np.array([[v]], dtype=np.uint16 if f in (
                "class",) else np.uint8 if f == "test" else np.uint16)
    names = np.empty((1, 196), dtype=object)
    for cid in range(1, 197):
        names[0, cid - 1] = f"Maker Model {cid} 2012"
    scipy.io.savemat(os.path.join(root, "cars_annos.mat"), {"annotations": ann, "class_names": names})
    return root


SOP_SUPER = ["bicycle_final", "cabinet_final", "chair_final"]


def make_sop(root: str, train_classes: int = 6, test_classes: int = 6, seed: int = 2) -> str:
    """Stanford_Online_Products/ with Ebay_train.txt / Ebay_test.txt; class ids continue from train to test."""
    rng = np.random.default_rng(seed)
    sop = os.path.join(root, "Stanford_Online_Products")
    image_id, class_id = 1, 1
    for split, n in (("train", train_classes), ("test", test_classes)):
        lines = ["image_id class_id super_class_id path"]
        for _ in range(n):
            super_id = class_id % len(SOP_SUPER) + 1
            product = 111085122871 + class_id * 13
            for k in range(2 + class_id % 2):
                rel = f"{SOP_SUPER[super_id - 1]}/{product}_{k}.JPG"
                save(os.path.join(sop, rel), jpeg(rng, class_id, (26, 22)))
                lines.append(f"{image_id} {class_id} {super_id} {rel}")
                image_id += 1
            class_id += 1
        with open(os.path.join(sop, f"Ebay_{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return sop


def make_folder(root: str, classes: int = 6, per_class: int = 5, seed: int = 3) -> str:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        for k in range(per_class):
            save(os.path.join(root, f"class_{c:02d}", f"img_{k}.jpg"), jpeg(rng, c))
    return root


def read_split(split_dir: str) -> list[dict]:
    """Every sample of a split, read with tarfile (independent of the reader under test)."""
    samples = {}
    for name in read_manifest(split_dir).shard_names:
        with tarfile.open(os.path.join(split_dir, name)) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return list(samples.values())


def check_split(split_dir: str, num_samples: int, class_ids: list) -> list[dict]:
    m = read_manifest(split_dir)
    assert m.num_samples == num_samples and m.class_ids == class_ids and m.num_classes == len(class_ids)
    for path, n, sha in zip(m.shards, m.shard_counts, m.shard_sha256):
        assert sha256_file(path) == sha and n > 0
    samples = read_split(split_dir)
    assert len(samples) == num_samples
    for s in samples:
        meta = json.loads(s["json"])
        assert int(s["cls"]) == meta["label"] == class_ids.index(meta["class_id"])
        assert m.class_names[meta["label"]] == meta["class_name"]
    return samples


def test_cub_folder_and_archive(tmp_path):
    cub = make_cub(str(tmp_path / "src"))
    out = tmp_path / "out"
    summary = write_dataset("cub200", cub, out, shard_size="8kB", workers=2, progress=False)
    assert summary["train"]["num_shards"] > 3
    train = check_split(str(out / "train"), 200, list(range(1, 101)))
    check_split(str(out / "test"), 200, list(range(101, 201)))
    m = read_manifest(out / "train")
    assert m.dataset == "cub200" and m.split == "train" and m.class_names[0] == "001.Bird_1"
    # bytes stored as they were, with the original path
    s = train[0]
    meta = json.loads(s["json"])
    with open(os.path.join(cub, meta["path"]), "rb") as f:
        assert f.read() == s["jpg"]
    # the .tgz gives the same shards (same seed, fixed mtime)
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cub, arcname="CUB_200_2011")
    out2 = tmp_path / "out2"
    write_dataset("cub200", str(archive), out2, shard_size="8kB", workers=2, progress=False)
    assert read_manifest(out2 / "test").shard_sha256 == read_manifest(out / "test").shard_sha256
    assert not [p for p in os.listdir(out2) if p.startswith(".unpack")]


def test_cars196_mat(tmp_path):
    src = make_cars(str(tmp_path / "cars"))
    out = tmp_path / "out"
    write_dataset("cars196", src, out, shard_size="16kB", workers=2, progress=False)
    train = check_split(str(out / "train"), 98, list(range(1, 99)))
    check_split(str(out / "test"), 98, list(range(99, 197)))
    assert read_manifest(out / "test").class_names[0] == "Maker Model 99 2012"
    meta = json.loads(train[0]["json"])
    assert meta["path"].startswith("car_ims/") and meta["bbox"] == [1, 2, 20, 18]


def test_sop_lists(tmp_path):
    src = make_sop(str(tmp_path))
    out = tmp_path / "out"
    summary = write_dataset("sop", src, out, shard_size="4kB", workers=2, progress=False)
    train = check_split(str(out / "train"), summary["train"]["num_samples"], list(range(1, 7)))
    check_split(str(out / "test"), summary["test"]["num_samples"], list(range(7, 13)))
    assert summary["train"]["num_samples"] == 15 and summary["test"]["num_samples"] == 15
    assert read_manifest(out / "train").class_names[0] == "cabinet_final/111085122884"
    assert all("super_class_id" in json.loads(s["json"]) for s in train)


def test_folder_fraction_lists_and_modes(tmp_path):
    src = make_folder(str(tmp_path / "src"))
    # images of other modes: 1-bit, grey, palette, RGBA, 16-bit grey
    modes = {"bits.png": Image.new("1", (9, 7), 1), "grey.png": Image.new("L", (9, 7), 100),
             "palette.gif": Image.new("P", (9, 7), 3), "rgba.png": Image.new("RGBA", (9, 7), (10, 20, 30, 0)),
             "deep.png": Image.fromarray(np.arange(63, dtype=np.uint16).reshape(7, 9) * 1000)}
    for name, img in modes.items():
        img.save(os.path.join(src, "class_05", name))
    out = tmp_path / "frac"
    summary = write_dataset("folder", src, out, train_fraction=0.5, shard_size="1MB", progress=False)
    assert (summary["train"]["num_classes"], summary["test"]["num_classes"]) == (3, 3)
    test = check_split(str(out / "test"), 15 + len(modes), [3, 4, 5])
    for s in test:
        ext = next(k for k in s if k not in ("cls", "json"))
        assert np.asarray(decode_image(s[ext])).shape[2] == 3
    rgba = next(s for s in test if json.loads(s["json"])["path"].endswith("rgba.png"))
    assert np.asarray(decode_image(rgba["png"])).min() == 255       # transparent -> white
    out = tmp_path / "lists"
    write_dataset("folder", src, out, train_classes="class_01,class_04", test_classes=["class_00"], progress=False)
    check_split(str(out / "train"), 10, [1, 4])
    check_split(str(out / "test"), 5, [0])
    with pytest.raises(ValueError, match="not folders"):
        write_dataset("folder", src, tmp_path / "bad", train_classes=["nope"], progress=False)
    with pytest.raises(ValueError, match="train_fraction"):
        write_dataset("folder", src, tmp_path / "bad", train_fraction=1.5, progress=False)


def test_corrupt_images_reported_and_left_out(tmp_path):
    src = make_folder(str(tmp_path / "src"), classes=2)
    good = os.path.join(src, "class_00", "img_0.jpg")
    with open(good, "rb") as f:
        data = f.read()
    save(os.path.join(src, "class_00", "truncated.jpg"), data[: len(data) // 2])
    save(os.path.join(src, "class_01", "garbage.jpg"), b"not an image at all" * 10)
    summary = write_dataset("folder", src, tmp_path / "out", train_fraction=1.0, progress=False)
    s = summary["train"]
    assert s["num_samples"] == 10 and s["skipped"] == 2
    assert any("truncated.jpg" in p for p in s["skipped_paths"]) and any("garbage.jpg" in p for p in s["skipped_paths"])
    m = read_manifest(tmp_path / "out" / "train")
    assert m.num_samples == 10 and m.skipped["count"] == 2 and len(m.skipped["paths"]) == 2


def test_rerun_verifies_instead_of_rewriting(tmp_path):
    src = make_folder(str(tmp_path / "src"))
    out = tmp_path / "out"
    write_dataset("folder", src, out, shard_size="4kB", progress=False)
    shard = read_manifest(out / "train").shards[0]
    before = os.stat(shard).st_mtime_ns
    again = write_dataset("folder", src, out, shard_size="4kB", progress=False)
    assert again["train"]["status"] == again["test"]["status"] == "verified"
    assert os.stat(shard).st_mtime_ns == before
    with open(shard, "r+b") as f:       # damage one shard: the re-run says so and rewrites nothing
        f.seek(600)
        f.write(b"XXXX")
    with pytest.raises(DamagedShard, match="does not match its sha256"):
        write_dataset("folder", src, out, shard_size="4kB", progress=False)
    rewritten = write_dataset("folder", src, out, shard_size="4kB", overwrite=True, progress=False)
    assert rewritten["train"]["status"] == "written"
    assert write_dataset("folder", src, out, shard_size="4kB", progress=False)["train"]["status"] == "verified"


def test_cli(tmp_path, capsys):
    src = make_sop(str(tmp_path))
    cmd = [sys.executable, "-m", "data_shards", "write", "sop", "--src", src, "--out", str(tmp_path / "o"),
           "--shard-size", "4kB", "--workers", "2", "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train: written: 15 images, 6 classes" in r.stdout
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "train: verified: 15 images" in r.stdout, r.stdout + r.stderr
    capsys.readouterr()
    assert cli_main(cmd[3:5] + ["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert re.fullmatch(r"python -m data_shards write: error: write_dataset: src \S*missing does not exist.*\n",
                        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        cli_main(["write", "imagenet", "--src", src, "--out", str(tmp_path / "x")])


def test_reencode_to_jpeg(tmp_path):
    src = make_folder(str(tmp_path / "src"), classes=2, per_class=2)
    Image.new("LA", (12, 10), (80, 255)).save(os.path.join(src, "class_01", "grey_alpha.png"))
    write_dataset("folder", src, tmp_path / "out", train_fraction=1.0, reencode=85, progress=False)
    samples = check_split(str(tmp_path / "out" / "train"), 5, [0, 1])
    assert all(set(s) == {"jpg", "cls", "json"} for s in samples)
    assert all(Image.open(io.BytesIO(s["jpg"])).mode == "RGB" for s in samples)
    with pytest.raises(ValueError, match="reencode"):
        write_dataset("folder", src, tmp_path / "bad", reencode=0, progress=False)
