"""Any class-per-folder tree (`SRC/<class>/**/<image>`, like torchvision's ImageFolder). Classes are
taken in sorted name order; their original id is that position. Split either by `train_fraction` (the
first round(fraction * C) classes train, the rest test) or by explicit `train_classes` / `test_classes`
(lists of folder names; with only one given, the other split is every remaining class).
Symlinked folders are followed, each real folder once per class: a link back to the class folder or above it (a
loop) or to a folder already listed is reported and not followed."""

import logging
import os

from ..errors import DataError
from . import IMAGE_SUFFIXES, Record, require

log = logging.getLogger("data_shards")


def list_images(folder: str) -> list[str]:
    """Image files under `folder` (by suffix, any file type: the writer skips what is not a regular file), in
    sorted order, every real folder visited once."""
    real = os.path.realpath(folder)
    seen = {real}
    while os.path.dirname(real) != real:      # the folders above: a link to one of them is a loop
        real = os.path.dirname(real)
        seen.add(real)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            target = os.path.realpath(os.path.join(dirpath, d))
            if target in seen:
                log.warning("folder: %s leads to %s, already listed or above it (a symlink loop?); not followed",
                            os.path.join(dirpath, d), target)
            else:
                seen.add(target)
                keep.append(d)
        dirnames[:] = keep
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def _names(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v]
    return list(value)


def collect(src: str, train_fraction: float | None = None, train_classes=None,
            test_classes=None) -> dict[str, list[Record]]:
    src = require(src, "folder --src")
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise DataError(f"folder: no class folders in {src}; give the folder that holds one folder per class")
    train_names, test_names = _names(train_classes), _names(test_classes)
    if train_names is None and test_names is None:
        frac = 0.5 if train_fraction is None else float(train_fraction)
        if not 0.0 <= frac <= 1.0:
            raise DataError(f"folder: train_fraction must be in [0, 1], got {train_fraction!r}")
        cut = round(frac * len(classes))
        train_names, test_names = classes[:cut], classes[cut:]
    else:
        if train_fraction is not None:
            raise DataError("folder: give train_fraction or train_classes/test_classes, not both")
        unknown = sorted((set(train_names or []) | set(test_names or [])) - set(classes))
        if unknown:
            raise DataError(f"folder: classes {unknown[:5]} are not folders of {src}")
        if train_names is None:
            train_names = [c for c in classes if c not in set(test_names or [])]
        if test_names is None:
            test_names = [c for c in classes if c not in set(train_names)]
        both = sorted(set(train_names) & set(test_names))
        if both:
            raise DataError(f"folder: classes {both[:5]} are in both train_classes and test_classes")
    ids = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, names in (("train", train_names), ("test", test_names)):
        records = []
        for name in sorted(names):
            for f in list_images(os.path.join(src, name)):
                records.append(Record(f, os.path.relpath(f, src), ids[name], name))
        splits[split] = records
    return splits
