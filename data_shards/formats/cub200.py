"""CUB-200-2011: the official `CUB_200_2011/` folder (images.txt, image_class_labels.txt, classes.txt,
images/) or the `CUB_200_2011.tgz` archive (unpacked into a temporary folder under the output first).
Classes 1-100 are the train split, 101-200 the test split."""

import os
import tarfile

from ..errors import DataError, MissingData
from . import Record, require

NEEDED = ("images.txt", "image_class_labels.txt", "classes.txt")


def find_root(src: str) -> str:
    for root in (src, os.path.join(src, "CUB_200_2011")):
        if all(os.path.isfile(os.path.join(root, f)) for f in NEEDED):
            return root
    raise MissingData(f"cub200: --src {src} holds neither {', '.join(NEEDED)} nor CUB_200_2011/ with them")


def unpack(archive: str, into: str) -> str:
    """Extract the metadata files and images/ of the archive into `into`; returns the CUB root there."""
    def wanted(members):
        for m in members:
            parts = m.name.split("/")
            if m.isreg() and (parts[-1] in NEEDED or "images" in parts[:-1]):
                yield m

    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(into, members=wanted(tar), filter="data")
    except (tarfile.TarError, EOFError, OSError) as exn:
        raise DataError(f"cub200: cannot unpack {archive} ({exn}); download CUB_200_2011.tgz again") from None
    return find_root(into)


def read_pairs(path: str) -> dict[int, str]:
    """`<id> <value>` lines. Raises DataError naming the first line that is not one."""
    pairs = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    a, b = line.split(" ", 1)
                    pairs[int(a)] = b.strip()
                except ValueError:
                    raise DataError(f"cub200: {path} line {n} is not '<id> <value>': {line.strip()[:80]!r}") from None
    return pairs


def collect(src: str, tmp_dir: str | None = None, train_classes: int = 100) -> dict[str, list[Record]]:
    if os.path.isfile(src):
        if tmp_dir is None:
            raise ValueError("cub200: reading an archive needs tmp_dir")
        root = unpack(src, tmp_dir)
    else:
        root = find_root(require(src, "cub200 --src"))
    images = read_pairs(os.path.join(root, "images.txt"))
    labels_file = os.path.join(root, "image_class_labels.txt")
    label_lines = read_pairs(labels_file)
    try:
        labels = {k: int(v) for k, v in label_lines.items()}
    except ValueError as exn:
        raise DataError(f"cub200: {labels_file} holds a class id that is not a number ({exn})") from None
    classes = read_pairs(os.path.join(root, "classes.txt"))
    missing = sorted(set(images) - set(labels))
    if missing:
        raise DataError(f"cub200: image ids {missing[:5]} have no line in {labels_file}")
    unknown = sorted(set(labels.values()) - set(classes))
    if unknown:
        raise DataError(f"cub200: class ids {unknown[:5]} of {labels_file} are not in classes.txt")
    splits: dict[str, list[Record]] = {"train": [], "test": []}
    for image_id, rel in sorted(images.items()):
        cid = labels[image_id]
        rec = Record(os.path.join(root, "images", rel), "images/" + rel, cid, classes[cid],
                     {"image_id": image_id})
        splits["train" if cid <= train_classes else "test"].append(rec)
    return splits
