"""manifest.json of one split: what was written (counts, classes, shards with sample counts and sha256).

A split location is a local directory, an http(s) base URL, or any webdataset URL template holding the
literal `{name}`, e.g. `pipe:aws s3 cp s3://bucket/cub/train/{name} -`: the manifest is read from
`{name}` = manifest.json and every shard from `{name}` = its file name, through `webdataset.gopen`.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field

import webdataset as wds

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def is_local(location: str) -> bool:
    return "{name}" not in location and "://" not in location and not location.startswith("pipe:")


def resolve(location: str, name: str) -> str:
    """The URL (or path) of file `name` of the split at `location`."""
    location = os.fspath(location)
    if "{name}" in location:
        return location.replace("{name}", name)
    if is_local(location):
        return os.path.join(location, name)
    return location.rstrip("/") + "/" + name


@dataclass
class Manifest:
    location: str
    dataset: str
    split: str
    num_samples: int
    num_classes: int
    class_names: list[str]
    class_ids: list
    shard_names: list[str]
    shard_counts: list[int]
    shard_sha256: list[str]
    skipped: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def shards(self) -> list[str]:
        """Shard paths or URLs, in manifest order."""
        return [resolve(self.location, n) for n in self.shard_names]


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(location) -> Manifest:
    """Read and check the manifest of the split at `location` (directory, URL or `{name}` template)."""
    location = os.fspath(location)
    url = resolve(location, MANIFEST)
    try:
        if is_local(location):
            with open(url, encoding="utf-8") as f:
                raw = json.load(f)
        else:
            with wds.gopen(url, "rb") as f:
                raw = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as exn:
        raise FileNotFoundError(f"read_manifest: no readable {MANIFEST} at {url!r} ({exn})") from exn
    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"read_manifest: {url} has format_version {raw.get('format_version')!r}, "
                         f"this code reads {FORMAT_VERSION}")
    shards = raw["shards"]
    m = Manifest(location=location, dataset=raw["dataset"], split=raw["split"],
                 num_samples=raw["num_samples"], num_classes=raw["num_classes"],
                 class_names=raw["class_names"], class_ids=raw["class_ids"],
                 shard_names=[s["name"] for s in shards], shard_counts=[s["num_samples"] for s in shards],
                 shard_sha256=[s["sha256"] for s in shards], skipped=raw.get("skipped", {}), raw=raw)
    if sum(m.shard_counts) != m.num_samples or len(m.class_names) != m.num_classes:
        raise ValueError(f"read_manifest: {url} is inconsistent (shard counts sum to {sum(m.shard_counts)}, "
                         f"num_samples {m.num_samples}; {len(m.class_names)} names, {m.num_classes} classes)")
    return m


def write_manifest(split_dir: str, manifest: dict) -> str:
    """Write manifest.json atomically (temp file + rename): its presence marks a finished split."""
    path = os.path.join(split_dir, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path
