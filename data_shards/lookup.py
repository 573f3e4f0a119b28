"""Images by sample key from the tar shards of a local split: `shard_image_lookup(split_dir)(keys)`, for the
pictures the tracker draws. Members are grouped into samples by the streams' own key rule (webdataset's
`base_plus_ext`), images recognised by the streams' extension list, keys as `eval_loader` yields them."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, cast

from webdataset.tariterators import base_plus_ext

from .manifest import read_manifest
from .stream import IMAGE_EXTS, sample_key


def _open(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """The data of a regular member (extractfile gives None only for other kinds)."""
    return cast(IO[bytes], tar.extractfile(member))


def shard_image_lookup(split_dir: str | os.PathLike) -> Callable[[Iterable[str]], dict]:
    """A lookup `keys -> {key: PIL.Image}` over the webdataset tar shards of a split directory.

    The first call indexes the shards (tar headers and the small json members; image data is skipped by
    seeking), later calls read just the requested images. Keys: the tar key (`__key__`) or the original path
    kept in the sample's json, which is what `eval_loader` yields as keys. Shards: those of the split's
    manifest.json (else every *.tar there); the first image extension of a sample (jpg, png, ...) is taken.
    """
    split = Path(split_dir)
    index: dict[str, tuple[Path, tarfile.TarInfo]] = {}

    def build() -> None:  # on first use: a remote split fails there (the tracker warns), not at construction
        if not split.is_dir():
            raise FileNotFoundError(f"shard_image_lookup: split_dir {str(split)!r} is not a local directory")
        if (split / "manifest.json").exists():
            shards = [Path(s) for s in read_manifest(str(split)).shards]
        else:
            shards = sorted(split.glob("*.tar"))
        missing = [str(s) for s in shards if not s.is_file()]
        if not shards or missing:
            raise FileNotFoundError(f"shard_image_lookup: split_dir {str(split)!r} has no local tar shards"
                                    + (f" (missing: {missing[:3]})" if missing else ""))
        for shard in shards:
            with tarfile.open(shard) as tar:
                metas = []
                for member in tar:
                    key, ext = base_plus_ext(member.name) if member.isfile() else (None, None)
                    if key is None:
                        continue
                    ext = str(ext).lower()
                    if ext.split(".")[-1] in IMAGE_EXTS:
                        index.setdefault(key, (shard, member))
                    elif ext == "json":
                        metas.append((key, member))
                for key, member in metas:  # the eval stream's keys are the original paths kept in the json
                    if key in index:
                        with _open(tar, member) as f:
                            index.setdefault(sample_key({"__key__": key, "json": f.read()}), index[key])

    def lookup(keys: Iterable[str]) -> dict:
        from PIL import Image

        if not index:
            build()
        by_shard: dict[Path, list[tuple[str, tarfile.TarInfo]]] = {}
        for key in keys:
            if key in index:
                shard, member = index[key]
                by_shard.setdefault(shard, []).append((key, member))
        images = {}
        for shard, members in by_shard.items():
            with tarfile.open(shard) as tar:
                for key, member in members:
                    with _open(tar, member) as f:
                        image = Image.open(f)
                        image.load()
                    images[key] = image
        return images

    return lookup
