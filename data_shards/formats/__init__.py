"""Readers of the source layouts: each `collect(src, **options)` returns {split: [Record, ...]}.

A source that is missing or does not parse raises DataError (MissingData) naming the file and the problem."""

import os
from dataclasses import dataclass, field

from ..errors import DataError, MissingData

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
        raise DataError(f"unknown format {fmt!r}; choose one of {sorted(readers)}")
    return readers[fmt](src, **options)


def require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise MissingData(f"{what}: {path} not found")
    return path
