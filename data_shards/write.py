"""Convert a dataset into webdataset tar shards + manifest.json per split:

    python -m data_shards write FORMAT --src PATH --out DIR [--shard-size 256MB]
    (FORMAT: cub200, cars196, sop, folder, or any registered in data_shards/formats/__init__.py)
    (--out s3://bucket/prefix: written locally, then uploaded to the bucket, each split's manifest last)

Each sample of a shard: `<key>.<ext>` the image bytes as stored (or re-encoded as JPEG with --reencode),
`<key>.cls` the contiguous class index 0..C-1 within the split (classes in original-id order), and
`<key>.json` {dataset, split, path, class_id, class_name, label, ...}. An image whose EXIF orientation says the
camera was turned is stored upright (PIL.ImageOps.exif_transpose, re-encoded: JPEG at quality 95, others as PNG);
the manifest says so (`exif_orientation: applied`, `exif_rotated`: how many). Shards written before have no such key:
their images are decoded as stored (sideways where the camera was turned); rewrite them (--overwrite) to fix that.
Samples are shuffled (seeded) before being cut into shards of about --shard-size bytes, and every image is decoded
once: one that cannot be is reported (count and paths, also in the manifest) and left out. So is anything that
is not a regular file (a FIFO, socket or device named like an image is never opened for a blocking read), and a
path that resolves to a file already taken (a symlink or hard link to it, in any split: the first in split order,
then listing order, is kept). Shards are written in parallel, one process per
shard (webdataset's TarWriter with a fixed integer mtime: plain ustar headers, no PAX record per member, and
the same input gives byte-identical shards; shards of earlier versions, with PAX records, still read);
ShardWriter is sequential, which is why it is not used. Re-running on a finished split verifies the
shards against the manifest (sha256, counts) instead of rewriting them (--overwrite rewrites).
"""

import argparse
import io
import json
import logging
import os
import random
import re
import stat
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed

import webdataset as wds
from PIL import Image, ImageOps
from tqdm import tqdm

from .errors import DamagedShard, DataError, MissingData
from .formats import Record, collect, formats, reader_options
from .manifest import (
    FORMAT_VERSION,
    MANIFEST,
    dataset_name,
    read_manifest,
    sha256_file,
    write_command,
    write_manifest,
    written_options,
)
from .object_store import is_s3
from .transforms import to_rgb
from .upload import write_to_store

log = logging.getLogger("data_shards")


def parse_size(value) -> int:
    """'256MB', '1.5GB', '500k' or a plain number of bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", str(value).lower())
    if not m:
        raise DataError(f"shard_size: cannot read {value!r} (examples: 256MB, 1GB, 500000)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


def read_regular(path: str) -> bytes:
    """The bytes of the regular file at `path` (symlinks followed). Anything else raises ValueError without
    blocking: the file is opened non-blocking (a FIFO without a writer opens at once) and checked on the open
    descriptor, so it cannot be swapped between the check and the read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"not a regular file ({FILE_KINDS.get(stat.S_IFMT(mode), 'not a file')})")
        return f.read()


def check_image(data: bytes) -> None:
    """Raise unless the bytes decode to an image (JPEGs at 1/8 scale: every block is still read)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()


def reencode_jpeg(data: bytes, quality: int) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        out = io.BytesIO()
        to_rgb(img).save(out, format="JPEG", quality=quality)
    return out.getvalue()


EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a camera held the picture (1 = as stored)


def apply_exif_orientation(data: bytes) -> bytes | None:
    """The image turned upright as its EXIF orientation says (PIL.ImageOps.exif_transpose), re-encoded (JPEG at
    quality 95, anything else as PNG); None when it is already upright (no tag, or 1): its bytes stay as they are."""
    with Image.open(io.BytesIO(data)) as img:
        if img.getexif().get(EXIF_ORIENTATION, 1) in (1, None):
            return None
        fmt = img.format
        upright = ImageOps.exif_transpose(img)
        out = io.BytesIO()
        if fmt == "JPEG":
            upright.save(out, format="JPEG", quality=95)
        else:
            upright.save(out, format="PNG")
    return out.getvalue()


def image_ext(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext) or "jpg"


def write_shard(path: str, items: list[tuple[int, int, Record]], reencode: int | None, tags: dict) -> dict:
    """Write one shard (to a temp name, then renamed); returns its manifest entry and skipped paths.
    tags ({dataset, split}) go into every sample's json."""
    tmp, skipped, count, rotated = path + ".tmp", [], 0, 0
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as tw:
        for index, label, rec in items:
            try:
                data = read_regular(rec.file)
                check_image(data)
                ext = image_ext(rec.file)
                upright = apply_exif_orientation(data)
                if upright is not None:  # decoders read pixels as stored: store them upright
                    data, rotated = upright, rotated + 1
                    ext = "jpg" if ext == "jpg" else "png"
                if reencode:
                    data = reencode_jpeg(data, reencode)
            except Exception as exn:  # unreadable, not a regular file or undecodable: reported, left out
                skipped.append(f"{rec.path}: {exn}")
                continue
            meta = dict(**tags, path=rec.path, class_id=rec.class_id, class_name=rec.class_name, label=label,
                        **rec.extra)
            tw.write({"__key__": f"{index:08d}", "jpg" if reencode else ext: data,
                      "cls": str(label).encode(), "json": json.dumps(meta).encode()})
            count += 1
    os.replace(tmp, path)
    return dict(name=os.path.basename(path), num_samples=count, sha256=sha256_file(path),
                bytes=os.path.getsize(path), skipped=skipped, exif_rotated=rotated)


def drop_duplicates(splits: dict[str, list[Record]]) -> dict[str, list[str]]:
    """Keep every real file once per dataset: a record whose file is one already taken (same device and inode:
    a symlink or hard link to it, or the same path listed again) is removed from its split (in place) and
    reported. The first in split order, then listing order, stays. Returns {split: [what was left out]}."""
    taken: dict[tuple[int, int], str] = {}
    dropped: dict[str, list[str]] = {}
    for split, records in splits.items():
        keep, dropped[split] = [], []
        for rec in records:
            try:
                st = os.stat(rec.file)
            except OSError:          # reported when the shard writer cannot read it
                keep.append(rec)
                continue
            first = taken.get((st.st_dev, st.st_ino))
            if first is None:
                taken[st.st_dev, st.st_ino] = f"{rec.path} ({split})"
                keep.append(rec)
            else:
                dropped[split].append(f"{rec.path}: the same file as {first} (a link or a repeat); left out")
        records[:] = keep
    return dropped


def plan_shards(records: list[Record], shard_size: int) -> list[list[int]]:
    """Cut record indices into consecutive groups of about shard_size bytes (at least one each)."""
    groups: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, rec in enumerate(records):
        n = os.path.getsize(rec.file) if os.path.exists(rec.file) else 0
        if current and size + n > shard_size:
            groups.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        groups.append(current)
    return groups


def verify_split(split_dir: str, dataset: str, split: str, num_records: int, progress: bool, *, src: str,
                 out: str, requested: dict) -> dict:
    """A finished split against the source, the options asked now (`requested`: seed, reencode, shard_size in
    bytes, the reader's options) and its manifest (sha256 of every shard). Raises DataError when the options
    differ from those it was written with, DamagedShard when it does not verify; both name the command that
    rewrites it as asked now."""
    m = read_manifest(split_dir)
    now = write_command(dataset, src, out, requested)
    written = written_options(m)
    canon = json.loads(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in requested.items()}))
    changed = sorted(k for k in set(written) | set(canon) if written.get(k) != canon.get(k))
    if changed and (m.dataset, m.split) == (dataset, split):
        def show(opts):
            return ", ".join(f"--{k.replace('_', '-')} {'(not given)' if opts.get(k) is None else opts[k]}"
                             for k in changed)
        raise DataError(f"data_shards write: {split_dir} was written with {show(written)}, not {show(canon)}: "
                        f"drop the changed option to keep it, or rewrite it with the new one:\n{now} --overwrite")
    problems = []
    if (m.dataset, m.split) != (dataset, split):
        problems.append(f"it holds {m.dataset}/{m.split}, not {dataset}/{split}")
    if m.num_samples + m.skipped.get("count", 0) != num_records:
        problems.append(f"it was written from {m.num_samples + m.skipped.get('count', 0)} source images, "
                        f"the source now has {num_records}")
    for name, sha in tqdm(list(zip(m.shard_names, m.shard_sha256)), desc=f"verify {split}", unit="shard",
                          leave=False, disable=not progress):
        path = os.path.join(split_dir, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
        elif sha256_file(path) != sha:
            problems.append(f"{name} does not match its sha256")
    if problems:
        raise DamagedShard(f"data_shards write: {split_dir} exists but does not verify: " + "; ".join(problems)
                           + f".\nRewrite it: {now} --overwrite (overwrite=True from Python)")
    return dict(split=split, status="verified", num_samples=m.num_samples, num_classes=m.num_classes,
                num_shards=len(m.shard_names), skipped=m.skipped.get("count", 0), skipped_paths=[])


def write_split(fmt: str, split: str, records: list[Record], split_dir: str, *, src: str, shard_size: int,
                workers: int, seed: int, reencode: int | None, progress: bool, left_out: list[str],
                options: dict, name: str | None = None, extra: dict | None = None) -> dict:
    """Write the shards and manifest of one split; left_out: what was dropped before (duplicates); options:
    the format reader's, recorded in the manifest (with seed, reencode, shard_size) to rewrite it the same way;
    extra: more manifest fields (the val classes held out of train)."""
    classes = sorted({(r.class_id, r.class_name) for r in records})
    if len({cid for cid, _ in classes}) != len(classes):
        raise DataError(f"{fmt}: a class id has several names in split {split} of {src}; fix the source's labels")
    label = {cid: i for i, (cid, _) in enumerate(classes)}
    records = list(records)
    random.Random(seed).shuffle(records)
    os.makedirs(split_dir, exist_ok=True)
    for stale in os.listdir(split_dir):
        if re.fullmatch(rf"{fmt}-\d{{6}}\.tar(\.tmp)?", stale):
            os.remove(os.path.join(split_dir, stale))
    groups = plan_shards(records, shard_size)
    entries: list[dict] = [{} for _ in groups]
    with ProcessPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(records), desc=f"{fmt} {split}", unit="img", disable=not progress) as bar:
        futures = {pool.submit(write_shard, os.path.join(split_dir, f"{fmt}-{k:06d}.tar"),
                               [(i, label[records[i].class_id], records[i]) for i in g], reencode,
                               dict(dataset=fmt, split=split)): (k, len(g))
                   for k, g in enumerate(groups)}
        for fut in as_completed(futures):
            k, n = futures[fut]
            entries[k] = fut.result()
            bar.update(n)
    skipped = sorted([p for e in entries for p in e.pop("skipped")] + left_out)
    rotated = sum(e.pop("exif_rotated") for e in entries)
    for e in [e for e in entries if e["num_samples"] == 0]:  # every image of the shard was undecodable
        os.remove(os.path.join(split_dir, e["name"]))
        entries.remove(e)
    if skipped:
        log.warning("data_shards write: %d file(s) of %s/%s were left out (unreadable, undecodable, not regular "
                    "files or duplicates): %s",
                    len(skipped), fmt, split, "; ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""))
    manifest = dict(format_version=FORMAT_VERSION, dataset=fmt, name=dataset_name(fmt, src, name), split=split,
                    num_samples=sum(e["num_samples"] for e in entries), num_classes=len(classes),
                    class_names=[n for _, n in classes], class_ids=[c for c, _ in classes],
                    shards=entries, skipped=dict(count=len(skipped), paths=skipped),
                    source=os.path.abspath(src), seed=seed, reencode=reencode, shard_size=shard_size,
                    options=options, exif_orientation="applied", exif_rotated=rotated, **(extra or {}))
    write_manifest(split_dir, manifest)
    return dict(split=split, status="written", num_samples=manifest["num_samples"], num_classes=len(classes),
                num_shards=len(entries), skipped=len(skipped), skipped_paths=skipped)


def write_dataset(fmt: str, src, out, *, shard_size="256MB", workers: int | None = None, seed: int = 0,
                  reencode: int | None = None, overwrite: bool = False, progress: bool = True,
                  name: str | None = None, val_classes=None, val_fraction: float | None = None, val_seed: int = 0,
                  **options) -> dict[str, dict]:
    """Write every split of `src` (format `fmt`) under `out/<split>/` (a folder, or s3://bucket/prefix: staged
    locally, then uploaded with each manifest last, see data_shards/upload.py); returns a summary per split.
    Raises DataError (MissingData, DamagedShard: a finished split that does not verify) naming the input and
    the fix; OSError when the output cannot be written.

    name: the dataset's name for people (trackers, summaries; default: the source folder's name for `folder`,
    else the format); it is recorded when a split is written (an existing output keeps its own).
    options go to the format's reader: cub200/cars196 `train_classes` (the last train class id), folder
    `train_fraction` or `train_classes` / `test_classes` (lists or comma-separated folder names).

    val_classes (names or ids, a list or comma-separated) or val_fraction (share of the train classes, chosen
    with val_seed): a third split `out/val` of whole classes taken out of the train classes (never the test
    classes; data_shards/holdout.py), recorded in the train and val manifests (`val_classes`).
    """
    if fmt not in formats():
        raise DataError(f"write_dataset: fmt must be one of {formats()}, got {fmt!r}")
    src, out = os.fspath(src), os.fspath(out)
    if is_s3(out):  # written in a local staging folder, then uploaded, manifests last (data_shards/upload.py)
        def write(staging):
            return write_dataset(fmt, src, staging, shard_size=shard_size, workers=workers, seed=seed,
                                 reencode=reencode, overwrite=True, progress=progress, **options)
        if not os.path.exists(src):
            raise MissingData(f"write_dataset: src {src} does not exist; give the dataset's folder (--src)")
        return write_to_store(write, out, overwrite=overwrite, progress=progress)
    if not os.path.exists(src):
        raise MissingData(f"write_dataset: src {src} does not exist; give the dataset's folder (--src)")
    if reencode is not None and not 1 <= int(reencode) <= 100:
        raise DataError(f"write_dataset: reencode is a JPEG quality in 1..100, got {reencode!r}")
    size, workers = parse_size(shard_size), workers or min(8, os.cpu_count() or 1)
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".unpack-") as tmp:
        if fmt == "cub200" and os.path.isfile(src):
            options["tmp_dir"] = tmp
        splits = collect(fmt, src, **options)
        extra = {}
        if val_classes is not None or val_fraction is not None:
            extra = hold_out_val(splits, val_classes, val_fraction, val_seed)
            options = {**options, **({"val_classes": val_classes} if val_classes is not None else
                                     {"val_fraction": val_fraction, "val_seed": val_seed})}
        dropped = drop_duplicates(splits)
        summary = {}
        for split, records in splits.items():
            split_dir = os.path.join(out, split)
            if not records:
                log.warning("data_shards write: split %s of %s is empty; nothing written", split, src)
                continue
            if os.path.isfile(os.path.join(split_dir, MANIFEST)) and not overwrite:
                requested = dict(seed=seed, reencode=reencode, shard_size=size) | {
                    k: v for k, v in options.items() if k != "tmp_dir"}
                summary[split] = verify_split(split_dir, fmt, split, len(records) + len(dropped[split]), progress,
                                              src=src, out=out, requested=requested)
            else:
                summary[split] = write_split(fmt, split, records, split_dir, src=src, shard_size=size,
                                             workers=workers, seed=seed, reencode=reencode, progress=progress,
                                             left_out=dropped[split], name=name,
                                             extra=extra if split != "test" else None,
                                             options={k: v for k, v in options.items() if k != "tmp_dir"})
    return summary


def hold_out_val(splits: dict[str, list[Record]], val_classes, val_fraction, val_seed: int) -> dict:
    """Move the records of the val classes (data_shards.holdout.pick_val_classes) from splits["train"] to a new
    splits["val"], in place; returns the manifest fields that record it."""
    from .holdout import VAL_SPLIT, pick_val_classes

    classes = lambda recs: sorted({(r.class_id, r.class_name) for r in recs})  # noqa: E731
    names = set(pick_val_classes(classes(splits.get("train", [])), classes(splits.get("test", [])),
                                 val_classes=val_classes, val_fraction=val_fraction, seed=val_seed))
    train = splits["train"]
    splits[VAL_SPLIT] = [r for r in train if r.class_name in names]
    train[:] = [r for r in train if r.class_name not in names]
    return {"val_classes": sorted(names), "val_from": "train", "val_seed": val_seed}


def add_write_parser(sub) -> None:
    p = sub.add_parser("write", help="convert a dataset to shards", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=formats())
    p.add_argument("--src", required=True, help="dataset folder (cub200: folder or CUB_200_2011.tgz)")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix; splits go to OUT/train, "
                   "OUT/test (OUT/val) (s3: written locally under $TMPDIR, then uploaded, each manifest last)")
    p.add_argument("--shard-size", default="256MB", help="target shard size (default 256MB)")
    p.add_argument("--workers", type=int, default=None, help="parallel shard writers (default min(8, cpus))")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order across shards")
    p.add_argument("--reencode", type=int, default=None, metavar="QUALITY",
                   help="re-encode every image as RGB JPEG of this quality (default: keep the bytes)")
    p.add_argument("--overwrite", action="store_true", help="rewrite a finished output instead of verifying")
    p.add_argument("--name", default=None,
                   help="the dataset's name in MLflow and the summaries (default: the --src folder's name for "
                        "folder, else the format)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--train-classes", default=None,
                   help="folder: comma-separated train class folders; cub200/cars196: last train class id")
    p.add_argument("--test-classes", default=None, help="folder: comma-separated test class folders")
    p.add_argument("--train-fraction", type=float, default=None,
                   help="folder: share of classes (in sorted order) for train (default 0.5)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-classes", default=None,
                     help="a val split (OUT/val) of these train classes (comma-separated names or ids)")
    val.add_argument("--val-fraction", type=float, default=None,
                     help="a val split (OUT/val) of this share of the train classes, chosen with --val-seed")
    p.add_argument("--val-seed", type=int, default=0, help="seed of the --val-fraction choice (default 0)")


SPLIT_OPTIONS = ("train_classes", "test_classes", "train_fraction")  # passed to the readers that take them


def run_write(args) -> int:
    takes = reader_options(args.format)
    options = {key: getattr(args, key) for key in SPLIT_OPTIONS if getattr(args, key) is not None}
    for key in options:
        if key not in takes:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in SPLIT_OPTIONS if k in takes) or "none of them"
            raise DataError(f"--{key.replace('_', '-')}: the {args.format} format does not take it (it takes "
                            f"{flags})")
    if "train_classes" in options and takes["train_classes"] in (int, "int"):  # cub200, cars196: a class id
        try:
            options["train_classes"] = int(options["train_classes"])
        except ValueError:
            raise DataError(f"--train-classes: {args.format} takes the last train class id (a number), "
                            f"got {args.train_classes!r}") from None
    summary = write_dataset(args.format, args.src, args.out, shard_size=args.shard_size, workers=args.workers,
                            seed=args.seed, reencode=args.reencode, overwrite=args.overwrite, name=args.name,
                            progress=not args.no_progress, val_classes=args.val_classes,
                            val_fraction=args.val_fraction, val_seed=args.val_seed, **options)
    for split, s in summary.items():
        print(f"{split}: {s['status']}: {s['num_samples']} images, {s['num_classes']} classes, "
              f"{s['num_shards']} shards, {s['skipped']} left out -> {os.path.join(args.out, split)}")
        for p in s["skipped_paths"]:
            print(f"  left out: {p}")
    return 0
