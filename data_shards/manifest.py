"""manifest.json of one split: what was written (counts, classes, shards with sample counts, bytes and sha256).

A split location is a local directory, an S3 prefix `s3://bucket/prefix/<split>` (data_shards/object_store.py:
boto3, the standard AWS credentials), an http(s) base URL, or any webdataset URL template holding the
literal `{name}`, e.g. `pipe:aws s3 cp s3://bucket/cub/train/{name} -`: the manifest is read from
`{name}` = manifest.json and every shard from `{name}` = its file name, through `webdataset.gopen`.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field

import webdataset as wds

from .errors import BadManifest, DataError, MissingData, StoreUnavailable
from .object_store import is_s3, read_object

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
    shard_bytes: list = field(default_factory=list)  # int per shard; None where the manifest has no "bytes"
    skipped: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """The dataset's name for people (trackers, summaries): the writer's `--name`, else the source folder's
        name for the folder format, else the format (cub200, cars196, sop)."""
        return dataset_name(self.dataset, self.raw.get("source"), self.raw.get("name"))

    @property
    def shards(self) -> list[str]:
        """Shard paths or URLs, in manifest order."""
        return [resolve(self.location, n) for n in self.shard_names]

    def shard_url(self, i: int) -> str:
        """The path or URL of shard i (`shards[i]` without building the whole list)."""
        return resolve(self.location, self.shard_names[i])


def dataset_name(fmt: str, source: str | None, name: str | None = None) -> str:
    """`name` if given; for the folder format the source folder's name; else the format's name."""
    if name:
        return str(name)
    if fmt == "folder" and source:
        return os.path.basename(os.path.normpath(str(source))) or fmt
    return fmt


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def rewrite_hint(m: "Manifest | None" = None) -> str:
    """The command that rewrites the split of manifest `m` (its dataset, source and options, when known)."""
    if m is None:
        return "python -m data_shards write FORMAT --src SRC --out OUT --overwrite"
    out = (os.path.dirname(os.path.abspath(m.location)) if is_local(m.location)
           else m.location.rstrip("/").rsplit("/", 1)[0] if is_s3(m.location) else "OUT")
    return write_command(m.dataset, m.raw.get("source", "SRC"), out, written_options(m)) + " --overwrite"


def written_options(m: "Manifest") -> dict:
    """The writer's options recorded in manifest `m`: seed, reencode, shard_size and the format reader's."""
    return {k: m.raw.get(k) for k in ("seed", "reencode", "shard_size")} | dict(m.raw.get("options") or {})


def write_command(dataset: str, src: str, out: str, options: dict) -> str:
    """`python -m data_shards write` with these options (those at None or 0 left out)."""
    opts = "".join(f" --{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                   for k, v in options.items() if v not in (None, 0))
    return f"python -m data_shards write {dataset} --src {src} --out {out}{opts}"


def read_manifest(location) -> Manifest:
    """Read and check the manifest of the split at `location` (directory, URL or `{name}` template).

    Raises MissingData (also a FileNotFoundError) when the split or its manifest.json is not there (s3://: also a
    missing bucket; StoreAccessDenied, StoreUnavailable: see data_shards/object_store.py), and BadManifest when it
    is unreadable, of another format version or inconsistent (counts, classes, shards). Manifests without per-shard
    "bytes" (hand-made or foreign ones) are read; their shards' size is not checked.
    """
    location = os.fspath(location)
    url = resolve(location, MANIFEST)
    try:
        if is_local(location):
            with open(url, encoding="utf-8") as f:
                text = f.read()
        elif is_s3(location):
            text = read_object(url, "manifest").decode("utf-8")
        else:
            with wds.gopen(url, "rb") as f:
                text = f.read().decode("utf-8")
    except (DataError, StoreUnavailable):  # from the object store: already one line naming the object and fix
        raise
    except (OSError, UnicodeDecodeError) as exn:
        what = ("the split directory does not exist" if is_local(location) and not os.path.isdir(location)
                else "not a finished split" if is_local(location) else str(exn))
        raise MissingData(f"no readable {MANIFEST} at {url} ({what}); write the split first: "
                          f"{rewrite_hint().replace(' --overwrite', '')}") from None
    fix = f"rewrite the split ({rewrite_hint()})"
    try:
        raw = json.loads(text)
    except ValueError as exn:
        raise BadManifest(f"{url} is not valid JSON ({exn}); {fix}") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        version = raw.get("format_version") if isinstance(raw, dict) else None
        raise BadManifest(f"{url} has format_version {version!r}, this code reads {FORMAT_VERSION}; {fix}")
    try:
        shards = raw["shards"]
        m = Manifest(location=location, dataset=raw["dataset"], split=raw["split"],
                     num_samples=int(raw["num_samples"]), num_classes=int(raw["num_classes"]),
                     class_names=list(raw["class_names"]), class_ids=list(raw["class_ids"]),
                     shard_names=[s["name"] for s in shards], shard_counts=[int(s["num_samples"]) for s in shards],
                     shard_sha256=[s["sha256"] for s in shards], shard_bytes=[s.get("bytes") for s in shards],
                     skipped=raw.get("skipped", {}), raw=raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exn:
        raise BadManifest(f"{url} lacks or garbles a field ({exn!r}); {fix}") from None
    problems = []
    if sum(m.shard_counts) != m.num_samples:
        problems.append(f"shard counts sum to {sum(m.shard_counts)}, num_samples is {m.num_samples}")
    if not len(m.class_names) == len(m.class_ids) == m.num_classes:
        problems.append(f"{len(m.class_names)} class names and {len(m.class_ids)} class ids "
                        f"for {m.num_classes} classes")
    if min(m.shard_counts, default=0) < 0 or len(set(m.shard_names)) != len(m.shard_names):
        problems.append("negative shard counts or repeated shard names")
    if problems:
        raise BadManifest(f"{url} is inconsistent ({'; '.join(problems)}); rewrite the split ({rewrite_hint(m)})")
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
