"""Class-balanced batches (`sampler="m_per_class"`): one window of raw samples regrouped into batches of
batch_size / m classes x m samples each, as pytorch-metric-learning's MPerClassSampler does."""
from __future__ import annotations

import random


def classes_per_batch(batch_size: int, m: int) -> int | None:
    """The m_per_class rule: a batch of `batch_size` is batch_size // m classes of m samples each. That number of
    classes, or None when there is no such batch (m < 1, or m does not divide batch_size)."""
    return batch_size // m if m >= 1 and batch_size % m == 0 else None


def m_per_class_groups(labels: list, num_batches: int, batch_size: int, m: int, rng: random.Random) -> list[list[int]]:
    """`num_batches` lists of `batch_size` indices into `labels` (any hashable class ids, e.g. ints), each made
    of batch_size // m distinct classes with m indices of that class, the classes' runs consecutive.

    Per batch the classes are drawn without replacement with weight 1 + (the class's unused indices)
    (Efraimidis-Spirakis keys from `rng`), so that the window's samples are used about evenly; a class's
    indices are used in a shuffled order and only reused once all were used (a class with fewer than m
    indices repeats some in the batch, as pytorch-metric-learning's MPerClassSampler does). Deterministic
    given the rng's state. Raises ValueError when m does not divide batch_size or when labels hold fewer than
    batch_size // m classes."""
    per_batch = classes_per_batch(batch_size, m)
    if per_batch is None:
        raise ValueError(f"m_per_class: m={m} must be >= 1 and divide the batch size {batch_size}")
    by_class: dict = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    classes = sorted(by_class)
    if len(classes) < per_batch:
        raise ValueError(f"m_per_class: a batch of {batch_size} needs {per_batch} classes of m={m} samples, but "
                         f"this window of {len(labels)} samples holds only {len(classes)} classes")
    unused: dict = {c: [] for c in classes}

    def take(c) -> int:
        if not unused[c]:
            unused[c] = list(by_class[c])
            rng.shuffle(unused[c])
        return unused[c].pop()

    batches = []
    for _ in range(num_batches):
        keys = [(rng.random() ** (1.0 / (1 + len(unused[c]))), c) for c in classes]
        chosen = [c for _, c in sorted(keys, reverse=True)[:per_batch]]
        batches.append([take(c) for c in chosen for _ in range(m)])
    return batches
