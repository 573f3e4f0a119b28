"""Start-up checks: what the manifests already tell (sizes, classes, batch fit) is checked before any work,
so a run never trains an epoch to then crash on an empty test split, nor ends after 0 steps with status 0."""
from __future__ import annotations

from data_shards import Manifest
from data_shards.sampler import classes_per_batch
from trainer.config import ConfigError


def check_data(global_batch: int, train: Manifest, test: Manifest, world_size: int, sampler: str = "shuffle",
               m_per_class: int = 4) -> None:
    """Raise ConfigError (naming the key, the split and the fix) when the splits cannot make a run:
    fewer than 2 train classes, a global batch larger than the train split, a test split of fewer than 2 samples
    or 2 classes, and with
    sampler "m_per_class" fewer train classes than a per-rank batch needs (per-rank batch / m_per_class)."""
    if train.num_classes < 2:
        raise ConfigError(f"data.root: the train split {train.location} has {train.num_classes} class; metric "
                          f"learning needs at least 2 (rewrite the shards with more classes)")
    if train.num_samples < global_batch:
        raise ConfigError(f"train.batch_size: the global batch {global_batch} is larger than the train split "
                          f"{train.location} ({train.num_samples} samples), so no step would run; lower "
                          f"train.batch_size (at most {train.num_samples // world_size * world_size})")
    per_batch = classes_per_batch(global_batch // world_size, m_per_class)
    if sampler == "m_per_class" and per_batch is not None and train.num_classes < per_batch:
        raise ConfigError(f"data.m_per_class: a per-rank batch of {global_batch // world_size} with m_per_class="
                          f"{m_per_class} needs {per_batch} classes, the train split {train.location} has "
                          f"{train.num_classes}; raise data.m_per_class to at least "
                          f"{-(-(global_batch // world_size) // train.num_classes)} or lower train.batch_size")
    if test.num_samples < 2:
        raise ConfigError(f"data.test_split: the test split {test.location} has {test.num_samples} sample(s): "
                          f"nothing to evaluate retrieval on; write a test split (python -m data_shards write ...)")
    if test.num_classes < 2:  # every neighbour would be of the query's class: every metric 1.0, meaning nothing
        raise ConfigError(f"data.test_split: the test split {test.location} has {test.num_classes} class; retrieval "
                          f"metrics need at least 2 (with one, every neighbour matches and every metric is 1.0): "
                          f"write a test split of 2 classes or more")
