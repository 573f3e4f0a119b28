"""The tar format of the shards: plain headers (integer mtime, no PAX records), byte-identical rewrites, and
shards written by the previous writer (float mtime, so a PAX header per member) still read the same."""

import json
import os
import shutil
import tarfile

import pytest
import torch
import webdataset as wds

from data_shards import TransformConfig, eval_loader, read_manifest, train_loader, write_dataset
from data_shards.manifest import MANIFEST, sha256_file
from tests.data_shards.test_data_layouts import make_folder

TF = TransformConfig(image_size=24, resize_size=28)


def header_sizes(path) -> list[int]:
    """Per member: the bytes of its header records (512 for a plain ustar header; more with a PAX record)."""
    with tarfile.open(path) as tar:
        return [m.offset_data - m.offset for m in tar.getmembers()]


def pax_free(path) -> bool:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        return not tar.pax_headers and all(not m.pax_headers and type(m.mtime) is int for m in members)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("format")
    src = make_folder(str(root / "src"), classes=6, per_class=6)
    write_dataset("folder", src, root / "new", train_fraction=1.0, shard_size="20kB", progress=False)
    return root


def test_shards_have_plain_headers_and_are_reproducible(split, tmp_path):
    m = read_manifest(split / "new" / "train")
    assert len(m.shards) > 1
    for path in m.shards:
        sizes = header_sizes(path)
        assert len(sizes) == 3 * m.shard_counts[m.shards.index(path)]  # image, cls, json per sample
        assert set(sizes) == {512} and pax_free(path)
        with tarfile.open(path) as tar:
            assert {t.mtime for t in tar} == {0}
    write_dataset("folder", split / "src", tmp_path / "again", train_fraction=1.0, shard_size="20kB",
                  progress=False)
    again = read_manifest(tmp_path / "again" / "train")
    assert again.shard_names == m.shard_names
    assert [sha256_file(p) for p in again.shards] == [sha256_file(p) for p in m.shards]


def rewrite_the_old_way(split_dir) -> None:
    """Rewrite every shard of a split as the previous writer did (TarWriter with mtime=0.0, whose float makes
    tarfile add a PAX header per member), and update the manifest's bytes and sha256 to match."""
    manifest_path = os.path.join(split_dir, MANIFEST)
    with open(manifest_path) as f:
        manifest = json.load(f)
    for entry in manifest["shards"]:
        path = os.path.join(split_dir, entry["name"])
        samples = list(wds.tarfile_samples([{"url": path}]))
        with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0.0) as tw:
            for s in samples:
                tw.write({k: v for k, v in s.items() if k != "__url__" and k != "__local_path__"})
        entry.update(bytes=os.path.getsize(path), sha256=sha256_file(path))
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


def test_old_shards_with_pax_headers_still_read(split, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(split / "new" / "train", old)
    rewrite_the_old_way(old)
    m = read_manifest(old)
    assert all(min(header_sizes(p)) > 512 and not pax_free(p) for p in m.shards)  # a PAX record per member
    new = read_manifest(split / "new" / "train")
    assert [sha256_file(p) for p in m.shards] != [sha256_file(p) for p in new.shards]
    for verify in ("quick", "sha256"):
        kw = dict(batch_size=4, num_workers=2, seed=1, epoch=1, transform=TF, verify=verify)
        got = [(x.clone(), y.clone()) for x, y in train_loader(old, **kw)]
        ref = [(x.clone(), y.clone()) for x, y in train_loader(split / "new" / "train", **kw)]
        assert len(got) == len(ref) == 36 // 4
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, ref))
    keys = sorted(k for _, _, ks in eval_loader(old, batch_size=5, num_workers=2, transform=TF) for k in ks)
    assert keys == sorted(k for _, _, ks in eval_loader(split / "new" / "train", batch_size=5, num_workers=2,
                                                       transform=TF) for k in ks)
    assert len(keys) == 36
