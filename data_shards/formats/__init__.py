"""Readers of the source layouts: each `collect(src, **options)` returns {split: [Record, ...]}, registered under
the format's name (`python -m data_shards write NAME`); the built-in ones at the end of this file, one line each.

    register_format("myset", myset.collect)       # a new format: one file with its collect(), one line

A source that is missing or does not parse raises DataError (MissingData) naming the file and the problem."""

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from registry import Registry

from ..errors import DataError, MissingData

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


@dataclass
class Record:
    file: str               # where the bytes are read from
    path: str               # the image's original path, relative to the dataset root
    class_id: int           # the original class id of the dataset
    class_name: str
    extra: dict = field(default_factory=dict)   # stored in the sample's json (e.g. a bounding box)


Reader = Callable[..., dict[str, list[Record]]]  # collect(src, **options) -> {split: [Record, ...]}
_READERS: Registry[Reader] = Registry("format", same=lambda old, new: old is new)


def register_format(name: str, collect: Reader) -> None:
    """Make `name` a format of `python -m data_shards write` and `write_dataset`, read by `collect`. Raises
    ValueError when `name` is taken by another reader or is not a plain name (it prefixes shard file names)."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"format name {name!r}: letters, digits and _ only (it names the shard files)")
    _READERS.add(name, collect)


def unregister_format(name: str) -> None:
    """Remove format `name` (tests that register a toy format clean up with this)."""
    _READERS.remove(name)


def formats() -> tuple[str, ...]:
    """The registered format names, in registration order."""
    return tuple(_READERS.as_dict())


def reader_options(fmt: str) -> dict[str, object]:
    """{option: its annotation} of the keyword options format `fmt`'s reader takes besides `src` (what
    `python -m data_shards write` may pass it: --train-classes, --test-classes, --train-fraction)."""
    params = list(inspect.signature(_READERS.as_dict()[fmt]).parameters.values())[1:]
    return {p.name: p.annotation for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def collect(fmt: str, src: str, **options) -> dict[str, list[Record]]:
    if fmt not in _READERS:
        raise DataError(f"unknown format {fmt!r}; choose one of {sorted(_READERS.as_dict())}")
    return _READERS.as_dict()[fmt](src, **options)


def require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise MissingData(f"{what}: {path} not found")
    return path


from . import cars196, cub200, folder, sop  # noqa: E402 - the built-in formats, registered here

register_format("cub200", cub200.collect)
register_format("cars196", cars196.collect)
register_format("sop", sop.collect)
register_format("folder", folder.collect)
