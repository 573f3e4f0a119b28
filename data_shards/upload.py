"""Copy finished local splits to object storage, manifest last:

    python -m data_shards upload LOCAL_ROOT s3://bucket/prefix [--overwrite]

Every split of LOCAL_ROOT (a folder with `<split>/manifest.json`, as `python -m data_shards write` makes) is
checked against its manifest (every shard's sha256), then its shards are uploaded to `s3://bucket/prefix/<split>/`
(each with its sha256 in the object's metadata, which `verify=quick` compares), and manifest.json last: a reader
finds either no split or a whole one, never a half-uploaded one. An existing remote split is left alone when it
is the same data (same shards by sha256, every object of the right size), else refused without --overwrite;
with --overwrite its manifest is deleted first (readers stop seeing the old split), then everything is
uploaded and the objects of the old split that the new one does not have are deleted.

`python -m data_shards write ... --out s3://bucket/prefix` writes into a local staging folder (under $TMPDIR),
then uploads it this way. Credentials: the standard AWS ones (data_shards/object_store.py).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile

from tqdm import tqdm

from . import object_store
from .errors import DamagedShard, DataError, MissingData
from .manifest import MANIFEST, read_manifest, sha256_file

log = logging.getLogger("data_shards")


def local_splits(root: str) -> list[str]:
    """The split folders of `root` (those with a manifest.json), sorted. Raises MissingData when there is none."""
    if not os.path.isdir(root):
        raise MissingData(f"upload: {root} is not a folder; give the folder `python -m data_shards write` wrote")
    splits = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, MANIFEST)))
    if not splits:
        raise MissingData(f"upload: {root} has no split (no <split>/{MANIFEST}); write it first "
                          "(python -m data_shards write FORMAT --src SRC --out DIR)")
    return splits


def upload_split(split_dir: str, dest: str, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Upload one local split to the s3:// prefix `dest` (see the module docstring); returns its summary
    {split, status: uploaded | same, num_shards, bytes}. Raises DamagedShard (a local shard that does not match
    its manifest; a different remote split without overwrite), MissingData, StoreAccessDenied, StoreUnavailable."""
    m = read_manifest(split_dir)
    dest = dest.rstrip("/")
    for name, sha in zip(m.shard_names, m.shard_sha256):
        path = os.path.join(split_dir, name)
        if not os.path.isfile(path):
            raise MissingData(f"upload: shard {path} of {split_dir}/{MANIFEST} is missing; write the split again")
        if sha256_file(path) != sha:
            raise DamagedShard(f"upload: shard {path} does not match its sha256 in {split_dir}/{MANIFEST}; "
                               "write the split again before uploading it")
    summary = dict(split=m.split, num_shards=len(m.shard_names), bytes=sum(b or 0 for b in m.shard_bytes),
                   location=dest)
    remote_manifest = f"{dest}/{MANIFEST}"
    if object_store.exists(remote_manifest):
        if _same_split(m, dest):
            return summary | {"status": "same"}
        if not overwrite:
            raise DamagedShard(f"upload: {dest} already holds another version of {m.dataset}/{m.split}; "
                               "give --overwrite (overwrite=True) to replace it")
        object_store.delete(remote_manifest)  # readers stop seeing the old split before any shard changes
    before = set(object_store.list_keys(dest + "/"))
    for name, sha in tqdm(list(zip(m.shard_names, m.shard_sha256)), desc=f"upload {m.split}", unit="shard",
                          disable=not progress):
        object_store.upload_file(os.path.join(split_dir, name), f"{dest}/{name}", {"sha256": sha})
    object_store.upload_file(os.path.join(split_dir, MANIFEST), remote_manifest)  # published last
    for stale in sorted(before - {f"{dest}/{n}" for n in m.shard_names} - {remote_manifest}):
        if stale.endswith(".tar"):
            object_store.delete(stale)
    return summary | {"status": "uploaded"}


def _same_split(m, dest: str) -> bool:
    """Whether the remote split at `dest` is `m`'s data: same shards by sha256, every object of the right size."""
    try:
        remote = json.loads(object_store.read_object(f"{dest}/{MANIFEST}", "manifest"))
        if [s.get("sha256") for s in remote.get("shards", [])] != m.shard_sha256:
            return False
        return all(object_store.head(f"{dest}/{n}", "shard")["size"] == b
                   for n, b in zip(m.shard_names, m.shard_bytes))
    except (ValueError, AttributeError, MissingData):
        return False


def upload_dataset(root: str, dest: str, *, overwrite: bool = False, progress: bool = True) -> dict[str, dict]:
    """Upload every split of local `root` to `dest/<split>`; returns a summary per split."""
    if not object_store.is_s3(dest):
        raise DataError(f"upload: the destination must be s3://BUCKET/PREFIX, got {dest!r}")
    return {s: upload_split(os.path.join(root, s), f"{dest.rstrip('/')}/{s}", overwrite=overwrite,
                            progress=progress) for s in local_splits(root)}


def write_to_store(write, dest: str, *, overwrite: bool, progress: bool) -> dict[str, dict]:
    """`write(staging_dir)` (the local writer), then upload what it wrote to `dest`; the staging folder is
    removed. Returns the writer's summary per split, with status `written` or `same` (already in the store)."""
    with tempfile.TemporaryDirectory(prefix="data_shards-staging-") as staging:
        summary = write(staging)
        for split, s in summary.items():
            up = upload_split(os.path.join(staging, split), f"{dest.rstrip('/')}/{split}", overwrite=overwrite,
                              progress=progress)
            s["status"] = "written" if up["status"] == "uploaded" else "verified"
    return summary


def add_upload_parser(sub) -> None:
    p = sub.add_parser("upload", help="copy finished local splits to object storage (manifest last)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("root", help="local folder with <split>/manifest.json (what `write --out` made)")
    p.add_argument("dest", help="s3://bucket/prefix; splits go to DEST/<split>/")
    p.add_argument("--overwrite", action="store_true", help="replace another version of a split already there")
    p.add_argument("--no-progress", action="store_true")


def run_upload(args) -> int:
    summary = upload_dataset(args.root, args.dest, overwrite=args.overwrite, progress=not args.no_progress)
    for split, s in summary.items():
        what = "uploaded" if s["status"] == "uploaded" else "already there (same shards)"
        print(f"{split}: {what}: {s['num_shards']} shards, {s['bytes']} bytes -> {s['location']}")
    return 0
