"""Validation classes held out of the train classes: the `val` split of `data_shards write` and the k folds of a
hyperparameter search.

    names = pick_val_classes(train_classes, val_fraction=0.2, seed=0)      # whole classes, seeded
    folds = class_folds(class_names, k=3, seed=0)                          # k disjoint groups of classes
    write_class_splits([train_dir], out, {"train": [...], "val": [...]})   # new splits from written shards

Tuning on the test classes inflates what is reported (Musgrave et al., "A Metric Learning Reality Check", ECCV
2020): hyperparameters are chosen on classes taken out of training, never on the test classes. A val split is
made of whole classes of the train split (zero-shot, as the test split), disjoint from the classes left to train
on; which classes follows from the seed alone. Classes are named by their class name, or their original class id
as a string.
"""
from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Sequence

from .errors import DataError
from .manifest import FORMAT_VERSION, read_manifest, sha256_file, write_manifest
from .tar_reader import tar_samples

VAL_SPLIT = "val"


def _names(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def pick_val_classes(train: list[tuple[object, str]], test: Sequence[tuple[object, str]] = (), *, val_classes=None,
                     val_fraction: float | None = None, seed: int = 0) -> list[str]:
    """The class names of the val split, taken from the train classes.

    train, test: (class_id, class_name) of each split's classes. val_classes: names or ids (a list or a
    comma-separated string); val_fraction: share of the train classes, round(F x C) of them, at least 1,
    chosen by `random.Random(seed)` from the classes in id order. Returns the chosen names in id order.
    Raises DataError when both or neither are given, a named class is a test class or no class at all, or
    fewer than 2 classes would be left on either side (retrieval needs 2 classes)."""
    if (val_classes is None) == (val_fraction is None):
        raise DataError("val split: give val_classes or val_fraction (--val-classes or --val-fraction), one of them")
    ordered = sorted(train, key=lambda c: (str(type(c[0])), c[0]))
    by_key = {**{str(cid): name for cid, name in ordered}, **{name: name for _, name in ordered}}
    if val_fraction is not None:
        f = float(val_fraction)
        if not 0.0 < f < 1.0:
            raise DataError(f"--val-fraction: a share of the train classes in (0, 1), got {val_fraction!r}")
        count = max(1, round(f * len(ordered)))
        chosen = set(random.Random(seed).sample([name for _, name in ordered], count))
    else:
        wanted = _names(val_classes) or []
        test_keys = {str(cid) for cid, _ in test} | {name for _, name in test}
        in_test = [w for w in wanted if w in test_keys and w not in by_key]
        if in_test:
            raise DataError(f"--val-classes: {in_test[:5]} are test classes; val classes are taken from the train "
                            f"classes only (the test classes are evaluated once, never tuned on)")
        unknown = [w for w in wanted if w not in by_key]
        if unknown:
            raise DataError(f"--val-classes: {unknown[:5]} are not train classes (give class names or ids, e.g. "
                            f"{', '.join(n for _, n in ordered[:3])})")
        chosen = {by_key[w] for w in wanted}
    left = len(ordered) - len(chosen)
    if len(chosen) < 2 or left < 2:
        raise DataError(f"val split: {len(chosen)} val class(es) and {left} train class(es) left of "
                        f"{len(ordered)}; each side needs at least 2 (change --val-classes / --val-fraction)")
    return [name for _, name in ordered if name in chosen]


def class_folds(class_names: list[str], k: int, seed: int = 0) -> list[list[str]]:
    """`k` disjoint groups of classes covering all of them (sizes differ by at most 1), seeded; each group is the
    val classes of one fold, the others its train classes. Raises DataError when a fold would have fewer than 2
    classes on either side."""
    names = sorted(class_names)
    if k < 2 or len(names) // k < 2 or len(names) - -(-len(names) // k) < 2:
        raise DataError(f"--folds {k}: {len(names)} train classes cannot make {k} folds of at least 2 val and 2 "
                        f"train classes each")
    random.Random(seed).shuffle(names)
    return [sorted(names[i::k]) for i in range(k)]


def write_class_splits(sources: list[str], out: str, splits: dict[str, list[str]], *,
                       shard_size: int = 64 << 20) -> dict[str, str]:
    """New splits `out/<split>/` made of whole classes of already written splits (`sources`, local split
    directories), their samples copied byte for byte and relabelled 0..C-1 (classes in the sources' order).

    splits: {split name: class names}; the names must be disjoint and each a class of a source. Each new
    manifest records where it came from (`derived_from`: the sources and their dataset). Returns {split:
    directory}. Raises DataError on an unknown or repeated class."""
    manifests = [read_manifest(s) for s in sources]
    owner = {}
    for m in manifests:
        for cid, name in zip(m.class_ids, m.class_names):
            owner[name] = (m, cid)
    seen: set[str] = set()
    for split, names in splits.items():
        unknown = [n for n in names if n not in owner]
        if unknown:
            raise DataError(f"{split}: classes {unknown[:5]} are not in {', '.join(sources)}")
        if seen & set(names):
            raise DataError(f"{split}: classes {sorted(seen & set(names))[:5]} are in two of the new splits")
        seen |= set(names)
    done = {}
    for split, names in splits.items():
        wanted = sorted(names, key=lambda n: (str(type(owner[n][1])), owner[n][1]))  # original id order
        label = {n: i for i, n in enumerate(wanted)}
        done[split] = _write_split(manifests, os.path.join(out, split), split, label, shard_size)
    return done


def _write_split(manifests, split_dir: str, split: str, label: dict[str, int], shard_size: int) -> str:
    os.makedirs(split_dir, exist_ok=True)
    dataset = manifests[0].dataset
    entries: list[dict] = []
    tar, count, size = None, 0, 0

    def close():
        nonlocal tar
        if tar is None:
            return
        tar.close()
        os.replace(path + ".tmp", path)
        entries.append(dict(name=os.path.basename(path), num_samples=count, sha256=sha256_file(path),
                            bytes=os.path.getsize(path)))
        tar = None

    def fail(exn):
        raise exn

    for j, m in enumerate(manifests):
        names = m.class_names
        prefix = f"s{j}-" if len(manifests) > 1 else ""  # keys stay unique when two splits are merged
        for url in m.shards:
            for sample in tar_samples(url, handler=fail):
                name = names[int(sample["cls"])]
                if name not in label:
                    continue
                if tar is None:
                    path = os.path.join(split_dir, f"{dataset}-{len(entries):06d}.tar")
                    tar, count, size = tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT), 0, 0  # noqa: SIM115
                meta = json.loads(sample["json"]) if "json" in sample else {}
                meta.update(split=split, label=label[name])
                fields = {k: v for k, v in sample.items() if not k.startswith("__") and k not in ("cls", "json")}
                fields.update(cls=str(label[name]).encode(), json=json.dumps(meta).encode())
                for ext, data in sorted(fields.items()):
                    info = tarfile.TarInfo(f"{prefix}{sample['__key__']}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
                    size += len(data)
                count += 1
                if size >= shard_size:
                    close()
    close()
    owners = {n: (cid, m) for m in manifests for cid, n in zip(m.class_ids, m.class_names)}
    names = sorted(label, key=lambda name: label[name])
    manifest = dict(format_version=FORMAT_VERSION, dataset=dataset, split=split,
                    num_samples=sum(e["num_samples"] for e in entries), num_classes=len(names), class_names=names,
                    class_ids=[owners[n][0] for n in names], shards=entries, skipped=dict(count=0, paths=[]),
                    derived_from=dict(splits=[str(m.location) for m in manifests], classes="whole classes"))
    write_manifest(split_dir, manifest)
    return split_dir
