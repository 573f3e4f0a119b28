"""Train-stream throughput from S3-compatible object storage against the same shards on local disk: the same
`data_shards.train_loader` (read + decode + augment), same workers, same plan, in paired rounds whose order
alternates (bench/data_bench.py's method); the S3 API is a moto server started here on 127.0.0.1 (in memory:
what it measures is the object-store path of the reader, HTTP included, not a remote network).

    python bench/s3_bench.py [--images 1920] [--workers 2] [--rounds 6] [--shard-size 16MB]

Needs moto's server (`pip install "moto[server]"`, requirements-dev.txt). Prints img/s (wall, from the first
batch) and img per CPU second for both, the median S3/local ratio over the pairs with its range, and the load
average. Target: >= 0.9x with 2 workers.

Measured 2026-12-03 19:39-19:48 UTC on the 2-core dev machine under heavy load from other jobs (load average 10-15
throughout), `python bench/s3_bench.py --rounds 6 --workers 0 2` (1,920 CUB-like JPEGs, 500x375, in 16 MB shards,
batch 32, default TransformConfig: RandomResizedCrop 224, flip, normalise):

| source | workers | img/s (wall) | img/CPU s | wall / local (median, 6 pairs) | range | per CPU s / local |
| --- | --- | --- | --- | --- | --- | --- |
| local disk | 0 | 107.7 | 339.1 | 1.00x | 1.00-1.00 | 1.00x |
| S3 (moto, 127.0.0.1) | 0 | 116.8 | 327.7 | 1.06x | 0.85-1.30 | 0.96x |
| local disk | 2 | 138.1 | 275.4 | 1.00x | 1.00-1.00 | 1.00x |
| S3 (moto, 127.0.0.1) | 2 | 136.0 | 267.1 | 0.97x | 0.72-1.46 | 0.97x |

The target is met without prefetching the next shard: a worker streams its piece from one GET per shard
(1 MB buffered reads; moto delivers ~780 MB/s here), so the store costs ~3-4% of a worker's CPU (HTTP, boto3)
against the JPEG decode and crop. The wide ranges are the machine's load; a quieter run (load 13-15, 960 images,
4 pairs) gave 1.06x wall (0.89-1.26) and 0.93x per CPU second with 2 workers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from data_bench import load, make_images, paired_rounds  # noqa: E402

from data_shards import TransformConfig, train_loader, write_dataset  # noqa: E402
from data_shards.upload import upload_dataset  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1920)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--shard-size", default="16MB")
    args = p.parse_args()
    torch.set_num_threads(1)
    from pathlib import Path

    from tests.services import MotoS3

    cfg = TransformConfig()
    with tempfile.TemporaryDirectory() as tmp:
        server = MotoS3(Path(tmp) / "moto").start()
        try:
            os.environ.update(server.env)
            os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
            src = make_images(os.path.join(tmp, "src"), args.images)
            write_dataset("folder", src, os.path.join(tmp, "shards"), train_fraction=1.0, shard_size=args.shard_size,
                          progress=False)
            server.boto().create_bucket(Bucket="bench")
            upload_dataset(os.path.join(tmp, "shards"), "s3://bench/shards", progress=False)
            local, remote = os.path.join(tmp, "shards", "train"), "s3://bench/shards/train"
            print(f"{args.images} images in shards of {args.shard_size}, batch {args.batch_size}, transform {cfg}, "
                  f"torch threads 1, {os.cpu_count()} cpus; load average at start: {load()}")
            rows = []
            for w in args.workers:
                makers = {"local disk": lambda w=w: train_loader(local, batch_size=args.batch_size, num_workers=w,
                                                                 transform=cfg),
                          "S3 (moto, 127.0.0.1)": lambda w=w: train_loader(remote, batch_size=args.batch_size,
                                                                           num_workers=w, transform=cfg)}
                rates = paired_rounds(makers, args.rounds)
                base = rates["local disk"]
                for name, r in rates.items():
                    wall = [a / b for (a, _), (b, _) in zip(r, base)]
                    cpu = [a / b for (_, a), (_, b) in zip(r, base)]
                    rows.append((name, w, statistics.median(x for x, _ in r), statistics.median(c for _, c in r),
                                 statistics.median(wall), min(wall), max(wall), statistics.median(cpu)))
                rows.append(("load", w, load()))
        finally:
            server.stop()
    print(f"\n| source | workers | img/s (wall) | img/CPU s | wall / local (median, {args.rounds} pairs) | range "
          "| per CPU s / local |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if row[0] == "load":
            print(f"| (load average after the {row[1]}-worker rounds: {row[2]}) | | | | | | |")
            continue
        name, w, rate, per_cpu, ratio, lo, hi, cratio = row
        print(f"| {name} | {w} | {rate:.1f} | {per_cpu:.1f} | {ratio:.2f}x | {lo:.2f}-{hi:.2f} | {cratio:.2f}x |")


if __name__ == "__main__":
    main()
