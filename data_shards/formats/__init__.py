"""Readers of the source layouts: each `collect(src, **options)` returns {split: [Record, ...]}."""

from dataclasses import dataclass, field

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


@dataclass
class Record:
    file: str               # where the bytes are read from
    path: str               # the image's original path, relative to the dataset root
    class_id: int           # the original class id of the dataset
    class_name: str
    extra: dict = field(default_factory=dict)   # stored in the sample's json (e.g. a bounding box)


def collect(fmt: str, src: str, **options) -> dict[str, list[Record]]:
    from . import cars196, cub200, folder, sop
    readers = {"cub200": cub200.collect, "cars196": cars196.collect, "sop": sop.collect, "folder": folder.collect}
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(readers)}")
    return readers[fmt](src, **options)


def require(path: str, what: str) -> str:
    import os
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path} not found")
    return path
