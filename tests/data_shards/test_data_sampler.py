"""The class-balanced (m-per-class) train stream on real shards: balance, equal batches across ranks, exact resume."""
import random
from collections import Counter

import pytest
import torch

from data_shards import TransformConfig, train_loader
from data_shards.errors import DataError
from data_shards.sampler import m_per_class_groups

TF = TransformConfig(image_size=16, resize_size=16)
FOLDER = (12, 8)  # the `shards` fixture (conftest.py): 12 classes x 8 JPEGs (96)


def balanced(labels: torch.Tensor, m: int) -> bool:
    counts = Counter(labels.tolist())
    return set(counts.values()) == {m} and len(counts) * m == len(labels)


def loader(split, **kw):
    args = dict(batch_size=8, num_workers=2, seed=5, epoch=1, transform=TF, sampler="m_per_class", m_per_class=2,
                sampler_window=2)
    return train_loader(split, **{**args, **kw})


def batches(tl):
    return [(x.clone(), y.clone()) for x, y in tl]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


@pytest.mark.timeout(60)
def test_groups_are_balanced_deterministic_and_use_samples_evenly():
    labels = [c for c in range(6) for _ in range(5)] + [6]  # class 6 has one sample only
    got = m_per_class_groups(labels, 7, 8, 4, random.Random(1))
    assert got == m_per_class_groups(labels, 7, 8, 4, random.Random(1))
    assert got != m_per_class_groups(labels, 7, 8, 4, random.Random(2))
    for group in got:
        assert balanced(torch.tensor([labels[i] for i in group]), 4)
    uses = Counter(i for group in got for i in group)
    for c in range(6):  # a class's samples are reused only after all of them were used
        counts = [uses[i] for i, y in enumerate(labels) if y == c]
        assert max(counts) - min(counts) <= 1
    with pytest.raises(ValueError, match="needs 3 classes"):
        m_per_class_groups([0, 0, 1, 1], 1, 6, 2, random.Random(0))
    with pytest.raises(ValueError, match="divide"):
        m_per_class_groups([0, 1], 1, 6, 4, random.Random(0))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["many", "one"])
def test_every_batch_has_m_per_class_and_two_ranks_get_equal_counts(shards, layout):
    split = shards / layout / "train"
    per_rank = []
    for rank in range(2):
        tl = loader(split, batch_size=4, rank=rank, world_size=2)
        got = batches(tl)
        per_rank.append((len(tl), len(got)))
        for x, y in got:
            assert x.shape == (4, 3, 16, 16) and balanced(y, 2)
    assert per_rank == [(96 // 8, 96 // 8)] * 2
    # one rank, batch 8 of 4 classes x 2; different epochs give different batches
    first, other = batches(loader(split)), batches(loader(split, epoch=2))
    assert len(first) == 12 and all(balanced(y, 2) for _, y in first) and not same(first, other)
    assert all(balanced(y, 4) for _, y in batches(loader(split, m_per_class=4)))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
def test_start_mid_epoch_is_the_tail_of_a_full_epoch(shards, world_size, rank):
    """Windows of 2 batches per worker: starting batches land at and inside windows, first and later ones."""
    split = shards / "many" / "train"
    kw = dict(batch_size=8 // world_size, rank=rank, world_size=world_size)
    full = batches(loader(split, **kw))
    assert len(full) == 96 // 8
    for b in (1, 2, 3, 5, len(full) - 1):
        assert same(batches(loader(split, start_batch=b, **kw)), full[b:]), b
    persistent = loader(split, persistent_workers=True, epoch=0, **kw)  # moved on by set_epoch, as the trainer does
    batches(persistent)
    assert same(batches(persistent.set_epoch(1, start_batch=3)), full[3:])
    persistent.close()


@pytest.mark.timeout(60)
def test_bad_sampler_arguments(shards):
    split = shards / "one" / "train"
    with pytest.raises(ValueError, match="sampler must be one of"):
        train_loader(split, batch_size=8, sampler="balanced")
    with pytest.raises(ValueError, match="m_per_class=3"):
        train_loader(split, batch_size=8, sampler="m_per_class", m_per_class=3)
    with pytest.raises(DataError, match="needs 16 classes.*data.sampler_window"):  # 12 classes in all
        batches(loader(split, m_per_class=1, sampler_window=1, batch_size=16))


@pytest.mark.timeout(60)
def test_config_key_chooses_the_sampler_and_names_bad_values():
    from trainer.config import ConfigError, check_world_size, load_config
    cfg = load_config("demo", ["data.sampler=m_per_class", "data.m_per_class=8"])
    assert (cfg.data.sampler, cfg.data.m_per_class, cfg.data.sampler_window) == ("m_per_class", 8, 16)
    assert load_config("demo").data.sampler == "shuffle"
    for bad, key in (("data.sampler=mpc", "data.sampler"), ("data.m_per_class=0", "data.m_per_class"),
                     ("data.m_per_class=5", "data.m_per_class"), ("data.sampler_window=0", "data.sampler_window")):
        with pytest.raises(ConfigError, match=key):
            load_config("demo", ["data.sampler=m_per_class", bad])
    with pytest.raises(ConfigError, match="per-rank batch 16"):  # 64 over 4 ranks: 16, not a multiple of 32
        check_world_size(load_config("demo", ["data.sampler=m_per_class", "data.m_per_class=32"]), 4)
