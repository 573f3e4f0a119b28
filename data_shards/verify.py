"""Integrity checks of a split's shards against its manifest: quick (size, first sample) or full sha256.

- quick: a local shard's size must be the manifest's `bytes` (in object storage: the object's size, and the sha256
  its writer put in the object's metadata, from one HEAD request), and its first sample must belong to the split
  (label within the manifest's classes, with the manifest's class id and name for that label, and the split and
  dataset recorded in the sample, for shards written since they are recorded). This catches truncated, appended
  and replaced shards, in particular a shard of another split copied over one of this split.
- sha256: quick, plus the sha256 of every shard's content against the manifest (reads the whole split once).

`verify_shards` runs when a loader is made, in the main process: every rank checks the size of every local
shard (one `stat` each, every epoch) and reads, for its share of the shards (rank r: shards r, r+W, ...), the
first sample (quick) or the whole shard (sha256), once per process (a shard whose size, mtime or inode changes
is checked again). The readers in the loader workers check size and first sample again at every shard open
(`check_size`, `check_sample`: a stat and one small JSON parse), so a shard replaced during a run is caught too.
A mismatch raises DamagedShard naming the shard, what was expected and found, and the command that rewrites
the split; a missing shard raises MissingData.
"""

import contextlib
import hashlib
import json
import os
import tarfile

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from . import object_store
from .errors import DamagedShard, DataError, MissingData, StoreUnavailable
from .manifest import Manifest, is_local, rewrite_hint
from .object_store import is_s3
from .tar_reader import tar_samples

VERIFY = ("quick", "sha256", "off")
_verified: set[tuple] = set()   # (mode, url, identity of the file) checked by this process


def damaged(m: Manifest, i: int, what: str) -> DamagedShard:
    return DamagedShard(f"damaged shard {m.shard_url(i)}: {what}.\nRewrite the split: {rewrite_hint(m)}")


def check_size(m: Manifest, i: int) -> tuple | None:
    """Shard i of a local or s3:// split: its size against the manifest's `bytes` (when recorded); in object
    storage also the sha256 the writer put in the object's metadata (when there) against the manifest's. Returns
    the shard's identity (size, mtime, inode; s3: size, ETag), None for other remote splits. Raises MissingData,
    DamagedShard (s3: StoreAccessDenied, StoreUnavailable)."""
    if is_s3(m.location):
        return _check_object(m, i)
    if not is_local(m.location):
        return None
    path = m.shard_url(i)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MissingData(f"shard {path} of {m.dataset}/{m.split} is missing.\n"
                          f"Rewrite the split: {rewrite_hint(m)}") from None
    expected = m.shard_bytes[i] if i < len(m.shard_bytes) else None
    if expected is not None and st.st_size != expected:
        raise damaged(m, i, f"{st.st_size} bytes, the manifest says {expected} (truncated, appended to or replaced)")
    return st.st_size, st.st_mtime_ns, st.st_ino


def _check_object(m: Manifest, i: int) -> tuple:
    url = m.shard_url(i)
    meta = object_store.head(url, "shard")
    expected = m.shard_bytes[i] if i < len(m.shard_bytes) else None
    if expected is not None and meta["size"] != expected:
        raise damaged(m, i, f"{meta['size']} bytes in the store, the manifest says {expected} (truncated or replaced)")
    sha = meta["metadata"].get("sha256")
    if sha and sha != m.shard_sha256[i]:
        raise damaged(m, i, f"the object's metadata says sha256 {sha}, the manifest says {m.shard_sha256[i]} "
                            "(a shard of another write uploaded over this one?)")
    return meta["size"], meta["etag"]


def check_sample(m: Manifest, i: int, sample: dict) -> None:
    """A sample read from shard i must belong to the manifest's split (label, class id and name, split).
    Raises DamagedShard."""
    key = sample.get("__key__")
    try:
        label = int(sample["cls"])
    except (KeyError, ValueError):
        raise damaged(m, i, f"its first sample {key} has no readable class label (.cls)") from None
    if not 0 <= label < m.num_classes:
        raise damaged(m, i, f"its first sample {key} has label {label}, outside the {m.num_classes} classes of "
                            f"{m.location}/manifest.json (a shard of another split or dataset?)")
    if "json" not in sample:
        return
    try:
        meta = json.loads(sample["json"])
        meta = meta if isinstance(meta, dict) else {}
    except ValueError:
        raise damaged(m, i, f"the metadata (.json) of its first sample {key} is garbled") from None
    found = {k: meta[k] for k in ("dataset", "split") if k in meta}
    expected = {k: getattr(m, k) for k in found}
    if found != expected:
        raise damaged(m, i, f"its first sample {key} is from {found}, the manifest is {expected} "
                            "(a shard of another split copied over this one?)")
    found = {k: meta[k] for k in ("class_id", "class_name") if k in meta}
    expected = {k: v for k, v in (("class_id", m.class_ids[label]), ("class_name", m.class_names[label]))
                if k in found}
    if found != expected:
        raise damaged(m, i, f"its first sample {key} has label {label} for class {found}, the manifest's "
                            f"label {label} is class {expected} (a shard of another split or dataset?)")


def first_sample(url: str) -> dict | None:
    """The first sample of the tar at `url` (None if it has none), reading no further. Raises OSError,
    tarfile.TarError on unreadable data."""
    if object_store.is_s3(url):
        with contextlib.closing(tar_samples(url, reraise)) as samples:
            return next(samples, None)
    stream = wds.gopen(url, "rb")
    try:
        return next(iter(group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))), None)
    finally:
        _close(stream)


def _close(stream) -> None:
    with contextlib.suppress(OSError):   # a pipe: closed early exits with SIGPIPE, which is expected here
        stream.close()


def reraise(exn: Exception) -> bool:
    raise exn


def sha256_url(url: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    stream = object_store.open_object(url, "shard", chunk) if object_store.is_s3(url) else wds.gopen(url, "rb")
    try:
        while block := stream.read(chunk):
            h.update(block)
    finally:
        _close(stream)
    return h.hexdigest()


def verify_shards(m: Manifest, mode: str = "quick", rank: int = 0, world_size: int = 1) -> None:
    """Check the shards of split `m` (see the module docstring); mode in VERIFY. Raises MissingData,
    DamagedShard."""
    if mode not in VERIFY:
        raise ValueError(f"verify must be one of {VERIFY}, got {mode!r}")
    if mode == "off":
        return
    ids = [check_size(m, i) for i in range(len(m.shard_names))]
    for i in range(rank, len(m.shard_names), world_size):
        url = m.shard_url(i)
        if any((done, url, ids[i]) in _verified for done in (mode, "sha256")):
            continue
        try:
            sample = first_sample(url)
            if sample is None and m.shard_counts[i] > 0:
                raise damaged(m, i, f"no sample could be read, the manifest says {m.shard_counts[i]}")
            if sample is not None:
                check_sample(m, i, sample)
            if mode == "sha256" and (sha := sha256_url(url)) != m.shard_sha256[i]:
                raise damaged(m, i, f"its sha256 is {sha}, the manifest says {m.shard_sha256[i]}")
        except (DataError, StoreUnavailable):  # a missing object, refused credentials, a store down: as they are
            raise
        except (OSError, tarfile.TarError, EOFError) as exn:
            raise damaged(m, i, f"not a readable tar ({exn.args[0] if exn.args else exn!r})") from None
        _verified.add((mode, url, ids[i]))


__all__ = ["VERIFY", "verify_shards", "check_size", "check_sample", "first_sample", "sha256_url"]
