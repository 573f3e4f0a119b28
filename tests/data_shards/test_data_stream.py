"""Train and eval streams on real shards (one process; the torchrun test is test_data_distributed.py)."""

import io
import json
import logging
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from data_shards import DamagedShard, TransformConfig, eval_loader, read_manifest, train_loader
from data_shards.transforms import decode_image
from tests.data_shards.test_data_layouts import read_split

TF = TransformConfig(image_size=24, resize_size=28)
FOLDER = (18, 5)  # the `shards` fixture (conftest.py): 18 classes x 5 JPEGs (90)


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_train_counts_labels_and_determinism(shards):
    split = shards / "many" / "train"
    m = read_manifest(split)
    assert m.num_samples == 90 and len(m.shards) >= 7
    tl = train_loader(split, batch_size=8, num_workers=2, seed=3, epoch=0, transform=TF)
    assert len(tl) == 90 // 8
    got = batches(tl)
    assert len(got) == len(tl)
    for x, y in got:
        assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert y.min() >= 0 and y.max() < m.num_classes
    assert same(got, batches(train_loader(split, batch_size=8, num_workers=2, seed=3, epoch=0, transform=TF)))
    other = batches(train_loader(split, batch_size=8, num_workers=2, seed=3, epoch=1, transform=TF))
    assert not same(got, other)
    assert torch.bincount(torch.cat([y for _, y in got]), minlength=18).max() <= 5


@pytest.mark.parametrize("layout,world_size,workers", [("many", 2, 2), ("many", 3, 1), ("one", 2, 2)])
def test_an_epoch_shows_each_sample_at_most_once(shards, layout, world_size, workers):
    """Encoded bytes (decode="none") of all ranks' batches: no image twice, and a new leftover each epoch."""
    split = shards / layout / "train"
    seen = {}
    for epoch in (0, 1):
        blobs = [bytes(b.numpy()) for rank in range(world_size)
                 for bs, _ in train_loader(split, batch_size=4, num_workers=workers, epoch=epoch, rank=rank,
                                           world_size=world_size, decode="none") for b in bs]
        assert len(blobs) == len(set(blobs)) == 90 // (4 * world_size) * 4 * world_size
        seen[epoch] = set(blobs)
    assert seen[0] != seen[1]


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
def test_start_batch_gives_the_rest_of_the_epoch(shards, world_size, rank):
    split = shards / "many" / "train"
    kw = dict(batch_size=4, num_workers=2, seed=7, epoch=2, rank=rank, world_size=world_size, transform=TF)
    full = batches(train_loader(split, **kw))
    for b in (1, 2, 5):
        rest = train_loader(split, start_batch=b, **kw)
        assert len(rest) == len(full) and rest.start_batch == b
        assert same(batches(rest), full[b:])


@pytest.mark.parametrize("layout", ["many", "one"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_equal_batches_on_every_rank_whatever_the_shard_count(shards, layout, world_size):
    split = shards / layout / "train"
    counts = []
    for rank in range(world_size):
        tl = train_loader(split, batch_size=5, num_workers=2, rank=rank, world_size=world_size, transform=TF)
        counts.append((len(tl), sum(1 for _ in tl)))
    assert counts == [(90 // (5 * world_size),) * 2] * world_size


@pytest.mark.parametrize("layout", ["many", "one"])
@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 2), (3, 2)])
def test_eval_sees_every_sample_once(shards, layout, world_size, workers):
    split = shards / layout / "train"
    keys, total = [], 0
    for rank in range(world_size):
        el = eval_loader(split, batch_size=7, num_workers=workers, rank=rank, world_size=world_size, transform=TF)
        got = [(x, y, k) for x, y, k in el]
        assert len(got) == len(el)
        for x, y, k in got:
            assert x.shape[1:] == (3, 24, 24) and len(k) == len(y) == x.shape[0]
            keys += k
        total += el.num_samples
    expected = sorted(json.loads(s["json"])["path"] for s in read_split(str(split)))
    assert sorted(keys) == expected and total == 90


def test_eval_is_deterministic(shards):
    split = shards / "many" / "train"
    a = [(x, k) for x, _, k in eval_loader(split, batch_size=16, num_workers=2, transform=TF)]
    b = [(x, k) for x, _, k in eval_loader(split, batch_size=16, num_workers=2, transform=TF)]
    assert [k for _, k in a] == [k for _, k in b] and all(torch.equal(x, u) for (x, _), (u, _) in zip(a, b))


def damaged_copy(src_split, dst):
    """The split with its first shard truncated mid-file and one image of its second shard garbled."""
    shutil.copytree(src_split, dst)
    m = read_manifest(dst)
    first, second = m.shards[0], m.shards[1]
    size = os.path.getsize(first)
    with open(first, "r+b") as f:
        f.truncate(size // 2 + 100)
    with tarfile.open(second) as tar:
        members = [(mb, tar.extractfile(mb).read()) for mb in tar.getmembers()]
    with tarfile.open(second, "w") as tar:
        first_jpg = next(mb.name for mb, _ in members if mb.name.endswith(".jpg"))
        for mb, data in members:
            if mb.name == first_jpg:
                data = data[:40]
                mb.size = len(data)
            tar.addfile(mb, io.BytesIO(data))
    return dst


def test_truncated_tar_and_corrupt_jpeg_are_skipped_with_a_count(shards, tmp_path, caplog):
    """With verify="off" (checks: test_data_integrity.py, where the default "quick" refuses this split)."""
    split = damaged_copy(shards / "many" / "train", tmp_path / "damaged")
    caplog.set_level(logging.WARNING, logger="data_shards")
    with pytest.raises(DamagedShard, match="folder-000000.tar: .* bytes, the manifest says"):
        train_loader(split, batch_size=8, num_workers=0, transform=TF)
    tl = train_loader(split, batch_size=8, num_workers=0, seed=1, transform=TF, verify="off")
    got = batches(tl)
    assert len(got) == len(tl) == 11 and all(x.shape[0] == 8 for x, _ in got)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert any("the shard ended early" in s for s in skipped)    # the truncated tar
    assert any("skipped sample" in s for s in skipped)           # the garbled JPEG
    counts = [int(re.search(r"\((\d+) skipped so far", s).group(1)) for s in skipped]
    assert counts == sorted(counts) and counts[-1] >= 5            # counted: 4 lost to the truncation + 1
    caplog.clear()
    keys = [k for _, _, ks in eval_loader(split, batch_size=8, num_workers=0, transform=TF, verify="off") for k in ks]
    assert 70 < len(keys) < 90 and len(set(keys)) == len(keys)
    assert any("skipped sample" in r.getMessage() for r in caplog.records)
    # with workers too: nothing crashes, nothing hangs, counts stay
    assert sum(1 for _ in train_loader(split, batch_size=8, num_workers=2, transform=TF, verify="off")) == 11
    el = eval_loader(split, batch_size=8, num_workers=2, transform=TF, verify="off")
    assert len([k for _, _, ks in el for k in ks]) == len(keys)


def test_pipe_urls(shards):
    split = shards / "many" / "train"
    url = f"pipe:cat {split}/{{name}}"
    m = read_manifest(url)
    assert m.shards[0] == f"pipe:cat {split}/{m.shard_names[0]}"
    local = batches(train_loader(split, batch_size=8, num_workers=2, transform=TF))
    assert same(batches(train_loader(url, batch_size=8, num_workers=2, transform=TF)), local)
    assert sum(len(k) for _, _, k in eval_loader(url, batch_size=8, num_workers=2, transform=TF)) == 90


def test_decode_none_yields_encoded_bytes(shards):
    split = shards / "many" / "train"
    tl = train_loader(split, batch_size=8, num_workers=2, decode="none", transform=TF)
    got = list(tl)
    assert len(got) == len(tl)
    blobs, labels = got[0]
    assert isinstance(blobs, list) and len(blobs) == 8 and blobs[0].dtype == torch.uint8 and labels.shape == (8,)
    assert decode_image(blobs[0].numpy().tobytes()).mode == "RGB"
    keys = [k for b, _, ks in eval_loader(split, batch_size=8, decode="none") for k in ks]
    assert len(keys) == 90


@pytest.mark.parametrize("make", ["train", "eval"])
def test_encoded_batches_cross_from_workers_as_one_tensor(shards, make):
    """decode="none": a worker's batch crosses as one flat tensor (one shared-memory segment, not B of them);
    the main process gets B views of it; the images (with their labels) are byte for byte those of 0 workers
    (in another order: the worker count is part of the plan)."""
    split = shards / "many" / "train"
    kw = dict(batch_size=8, decode="none", transform=TF)
    loader = train_loader if make == "train" else eval_loader
    by_workers, in_process = list(loader(split, num_workers=2, **kw)), list(loader(split, num_workers=0, **kw))
    assert len(by_workers) == len(in_process) > 0
    for blobs, labels, *_ in by_workers:
        assert len({b.untyped_storage().data_ptr() for b in blobs}) == 1 and all(b.is_contiguous() for b in blobs)
        assert len(blobs) == len(labels) == 8 or make == "eval"

    def images(batches):
        return sorted((bytes(b.numpy()), int(y)) for blobs, labels, *_ in batches for b, y in zip(blobs, labels))
    assert images(by_workers) == images(in_process)


def test_transform_config():
    from PIL import Image
    img = Image.new("RGB", (30, 30), (200, 100, 50))
    from data_shards.transforms import eval_transform
    rgb = eval_transform(TransformConfig(image_size=8, resize_size=8, mean=[0, 0, 0], std=[1, 1, 1]))(img)
    assert torch.allclose(rgb[:, 0, 0], torch.tensor([200, 100, 50]) / 255)
    bgr = eval_transform(TransformConfig(image_size=8, resize_size=8, channel_order="bgr", pixel_scale=255.0,
                                         mean=[104.0, 117.0, 128.0], std=[1.0, 1.0, 1.0]))(img)
    assert torch.allclose(bgr[:, 0, 0], torch.tensor([50 - 104.0, 100 - 117.0, 200 - 128.0]), atol=1e-3)
    with pytest.raises(ValueError, match="channel_order"):
        TransformConfig(channel_order="rbg")
    from omegaconf import OmegaConf

    from data_shards.transforms import as_transform_config
    node = OmegaConf.structured(TransformConfig(image_size=8, resize_size=8))   # the trainer's data.transform
    assert as_transform_config(node) == TransformConfig(image_size=8, resize_size=8)
    with pytest.raises(ValueError, match="unknown keys"):
        as_transform_config({"imagesize": 8})
    with pytest.raises(ValueError, match="scale"):
        TransformConfig(scale=[0.5, 0.1])


def test_bad_arguments(shards):
    split = shards / "many" / "train"
    with pytest.raises(ValueError, match="no full batch"):
        train_loader(split, batch_size=64, world_size=2, transform=TF)
    with pytest.raises(ValueError, match="start_batch"):
        train_loader(split, batch_size=8, start_batch=11, transform=TF)
    with pytest.raises(ValueError, match="decode"):
        train_loader(split, batch_size=8, decode="gpu")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        eval_loader(shards / "nothing-here", batch_size=8)


def worker_pids(loader) -> list[int]:
    it = loader.loader._iterator  # torch keeps the iterator (and its workers) of a persistent_workers loader
    return [w.pid for w in it._workers] if it is not None else []


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
def test_persistent_workers_serve_every_epoch_and_resume_exactly(shards, world_size, rank):
    """One loader with persistent workers, moved on by set_epoch: every epoch (also one started mid-way, and
    one after an epoch left half-read) gives exactly the batches of a new loader for it, from the same workers."""
    split = shards / "many" / "train"
    kw = dict(batch_size=4, num_workers=2, seed=7, rank=rank, world_size=world_size, transform=TF)
    fresh = {e: batches(train_loader(split, epoch=e, **kw)) for e in (0, 1, 2)}
    loader = train_loader(split, epoch=0, persistent_workers=True, **kw)
    assert same(batches(loader), fresh[0]) and len(fresh[0]) == len(loader) == 90 // (4 * world_size)
    pids = worker_pids(loader)
    assert len(pids) == 2
    assert same(batches(loader.set_epoch(1)), fresh[1])
    half = [b for _, b in zip(range(3), loader.set_epoch(2))]  # stopped after 3 batches
    assert same([(x.clone(), y.clone()) for x, y in half], fresh[2][:3])
    for b in (0, 5, len(loader) - 1):
        assert loader.set_epoch(2, start_batch=b) is loader and loader.start_batch == b and loader.epoch == 2
        assert same(batches(loader), fresh[2][b:])
    assert worker_pids(loader) == pids and all(os.path.exists(f"/proc/{p}") for p in pids)
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(3, start_batch=len(loader))


def test_set_epoch_without_workers_and_draft(shards):
    """num_workers=0 (the stream in this process) and draft decode: set_epoch gives a new loader's batches."""
    split = shards / "many" / "train"
    kw = dict(batch_size=8, num_workers=0, seed=2, transform=TF, draft=True)
    loader = train_loader(split, epoch=0, **kw)
    batches(loader)
    assert same(batches(loader.set_epoch(4, start_batch=2)), batches(train_loader(split, epoch=4, **kw))[2:])


def test_persistent_eval_workers_serve_every_evaluation_and_recheck_the_shards(shards, tmp_path):
    """eval_loader(persistent_workers=True): each iteration gives every sample once, from the same worker
    processes; a shard replaced between two evaluations is refused at the next one; close() ends the workers."""
    split = tmp_path / "train"
    shutil.copytree(shards / "many" / "train", split)
    loader = eval_loader(split, batch_size=8, num_workers=2, transform=TF, persistent_workers=True)
    first = sorted(k for _, _, keys in loader for k in keys)
    pids = worker_pids(loader)
    assert len(first) == 90 and len(pids) == 2
    assert sorted(k for _, _, keys in loader for k in keys) == first and worker_pids(loader) == pids
    victim = read_manifest(split).shards[1]
    with open(victim, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DamagedShard, match="damaged shard"):
        list(loader)
    loader.close()
    status = [Path(f"/proc/{p}/status") for p in pids]
    assert not [s for s in status if s.exists() and "State:\tZ" not in s.read_text()]
