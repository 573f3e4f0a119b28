"""End-to-end training images/s fed by the CPU-decode loader and by the device-decode path, against the
backbone alone on synthetic tensors already on the device (the ceiling), in the same run.

    python bench/throughput.py [--data SPLIT_DIR] [--backbone resnet50] [--batch-size 256] [--image-size 224]
                               [--workers 1,4,8,16] [--steps 30] [--warmup 5] [--amp bf16] [--device auto]

A training step is the trainer's: `trainer.model.build_model` embedder (random init) + ProxyGML loss, AdamW,
optional bf16 autocast, channels_last on CUDA. Three feeds, same step:
  ceiling   one random batch on the device, reused;
  cpu       train_loader(decode="cpu", pin_memory on CUDA): workers decode + augment, `.to(device)`;
  device    train_loader(decode="none") + data_shards.gpu_transforms.device_batches: workers only read bytes,
            nvJPEG decodes and the device augments, on a side stream one batch ahead.
For each worker count it prints images/s and the ratio to the ceiling. Without --data a class folder of
textured 500x375 JPEGs (~35 kB at quality 90, like CUB's) is generated and sharded in a temp dir; timings
start after --warmup steps (loader start-up and cudnn autotuning excluded), and an epoch that ends is
followed by the next one (its loader start-up then counts, as in training).

Measured on the development machine, CPU only, 2 cores shared with other jobs (load average 12-16, so the
figures are noise-dominated and say nothing about a GPU): `python bench/throughput.py --device cpu --backbone
small_cnn --image-size 64 --resize-size 72 --batch-size 32 --workers 1,2 --steps 8 --warmup 2 --amp none`
(generated 500x375 JPEGs of ~35 kB):

| loader workers | ceiling img/s | cpu decode img/s | / ceiling | device decode img/s | / ceiling |
| --- | --- | --- | --- | --- | --- |
| 1 | 13.0 | 12.3 | 0.95 | 7.7 | 0.59 |
| 2 | 6.3 | 7.4 | 1.17 | 5.4 | 0.84 |

`--trainer` (CPU) instead times the trainer itself on the demo (digits shards, small CNN, batch 64, 1 loader
worker, persistent): `Trainer.train_epoch` against a plain loop of the same steps (the trainer's engine) fed by
the same loader, and against that loop over one epoch's batches held in memory; one epoch of each per round,
the order reversed every other round. Measured 2026-11-30 00:33 UTC on the 2-core dev machine (load average 1.6-1.8,
nothing else running), `python bench/throughput.py --trainer --rounds 6`, after the reader work of issue 17 (tar
reader, one fd per batch, crops as bytes):

| feed | steps/s (median) | trainer / this: median of paired ratios | range |
| --- | --- | --- | --- |
| trainer | 17.56 | 1.00 | 1.00-1.00 |
| plain loop, same loader | 18.11 | 0.96 | 0.94-1.00 |
| plain loop, tensors in memory | 22.77 | 0.78 | 0.72-0.80 |

The trainer keeps 0.96x of a plain loop on its loader (target >= 0.95x); the gap to tensors in memory is the
loader's (decode + augment in one worker, and each epoch's first batch: no prefetch across epochs), no longer
worker start-up per epoch (0.45-0.5x before the workers persisted). The day before (load average 2.6-4.2, before
the reader work): 15.37 steps/s, 0.97x the plain loop, 0.70x tensors in memory.

On the CPU the "device" path decodes in the training process, serially with the step, so it cannot win there;
the figure that matters is ResNet-50 at batch 256 bf16 on an H100/H200 (target: >= 90% of the ceiling with
<= 4 workers per GPU). Measured on an H200 on 2026-11-29 (torch 2.11, 16 cores; bench/results/gpu_check-h200.md):

| loader workers | ceiling img/s | cpu decode img/s | / ceiling | device decode img/s | / ceiling |
| --- | --- | --- | --- | --- | --- |
| 4 | 4092.3 | 876.2 | 0.21 | 2036.1 | 0.50 |
| 8 | 4251.4 | 3496.6 | 0.82 | 3525.0 | 0.83 |
| 14 | 4189.8 | 2239.6 | 0.53 | 3409.2 | 0.81 |

The device path was bound by its workers, which only read shards: each batch crossed to the main process as
one shared-memory segment per image. Batches now cross as one tensor (data_shards.stream.EncodedBatch): on the
H200 again (2026-11-29, bench/results/gpu_check-h200-restructure.md) the device path gave 3684.5 img/s at 4
workers, 0.90 of the 4084.6 img/s ceiling (cpu decode 0.27). Run there: `python bench/throughput.py --backbone
resnet50 --batch-size 256 --workers 1,4,8,16` (bench/gpu_check.sh runs it at 4 workers and checks the target).
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_shards import TransformConfig, read_manifest, train_loader, write_dataset  # noqa: E402
from data_shards.gpu_transforms import device_batches  # noqa: E402
from loss import ProxyGML  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.model import build_model  # noqa: E402


def make_dataset(out: str, num_images: int, classes: int, height: int, width: int, distinct: int = 64) -> str:
    """A class folder of textured JPEGs (`distinct` different pictures, repeated under other names) as shards;
    returns the train split directory."""
    src = os.path.join(out, "src")
    g = torch.Generator().manual_seed(0)
    blobs = []
    for _ in range(distinct):
        field = torch.rand(1, 3, 12, 12, generator=g) * 220
        img = torch.nn.functional.interpolate(field, size=(height, width), mode="bicubic", align_corners=False)[0]
        img = (img + 3 * torch.randn(img.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    for i in range(num_images):
        folder = os.path.join(src, f"class_{i % classes:04d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{i:07d}.jpg"), "wb") as f:
            f.write(blobs[i % distinct])
    write_dataset("folder", src, os.path.join(out, "shards"), train_fraction=1.0, progress=False)
    return os.path.join(out, "shards", "train")


class Step:
    """One training step of the trainer's model + loss; `sync()` waits for the device."""

    def __init__(self, args, num_classes: int, device: torch.device):
        cfg = ModelConfig(backbone=args.backbone, pretrained=False, dim=args.dim)
        self.model = build_model(cfg).to(device).train()
        self.criterion = ProxyGML(num_classes, args.dim).to(device)
        params = list(self.model.parameters()) + list(self.criterion.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.device, self.channels_last = device, device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
        self.autocast = torch.autocast(device.type, dtype=amp) if amp else nullcontext()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            emb = self.model(images)
        loss = self.criterion(emb.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def timed(batches, step: Step, warmup: int, steps: int) -> float:
    """images/s over `steps` steps after `warmup` steps."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it)[:2])
    step.sync()
    t0, seen = time.perf_counter(), 0
    for _ in range(steps):
        images, labels = next(it)[:2]
        step(images, labels)
        seen += labels.shape[0]
    step.sync()
    return seen / (time.perf_counter() - t0)


def cpu_feed(split, args, tcfg, workers: int, device: torch.device):
    pin = device.type == "cuda"
    for epoch in itertools.count():
        loader = train_loader(split, batch_size=args.batch_size, num_workers=workers, seed=0, epoch=epoch,
                              transform=tcfg, pin_memory=pin)
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def device_feed(split, args, tcfg, workers: int, device: torch.device, epochs: list):
    for epoch in itertools.count():
        loader = train_loader(split, batch_size=args.batch_size, num_workers=workers, seed=0, epoch=epoch,
                              transform=tcfg, decode="none")
        epochs.append(device_batches(loader, tcfg, device, seed=0))
        yield from epochs[-1]


def run(args) -> dict:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    tcfg = TransformConfig(image_size=args.image_size, resize_size=max(args.image_size, args.resize_size))
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        split = args.data
        if not split:
            n = args.batch_size * (args.warmup + args.steps)
            split = make_dataset(tmp, n, args.classes, args.source_height, args.source_width)
        m = read_manifest(split)
        step = Step(args, m.num_classes, device)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        y = torch.randint(0, m.num_classes, (args.batch_size,), device=device)
        rows = []
        for w in args.workers:  # the ceiling again next to each row: a shared machine's load drifts
            epochs: list = []
            ceiling = timed(itertools.repeat((x, y)), step, args.warmup, args.steps)
            cpu = timed(cpu_feed(split, args, tcfg, w, device), step, args.warmup, args.steps)
            dev = timed(device_feed(split, args, tcfg, w, device, epochs), step, args.warmup, args.steps)
            stats = {k: sum(e.stats.as_dict()[k] for e in epochs) for k in epochs[0].stats.as_dict()}
            rows.append({"workers": w, "ceiling": ceiling, "cpu": cpu, "device": dev, "device_stats": stats})
    return {"device": str(device), "rows": rows, "num_samples": m.num_samples}


def report(args, res: dict) -> str:
    name = torch.cuda.get_device_name() if res["device"].startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    lines = [f"{args.backbone}, batch {args.batch_size}, {args.image_size} px, amp {args.amp}, on {name}; "
             f"{res['num_samples']} shard samples",
             "ceiling: the same step on synthetic tensors already on the device, measured before each row", "",
             "| loader workers | ceiling img/s | cpu decode img/s | / ceiling | device decode img/s | / ceiling |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        c = r["ceiling"]
        lines.append(f"| {r['workers']} | {c:.1f} | {r['cpu']:.1f} | {r['cpu'] / c:.2f} | {r['device']:.1f} | "
                     f"{r['device'] / c:.2f} |")
    return "\n".join(lines)


def trainer_vs_plain(args) -> dict:
    """The demo (trainer/configs/demo.yaml: digits shards, small CNN, CPU) three ways, one epoch each per
    round, in an order reversed every other round: `Trainer.train_epoch` (the trainer's loop: its loader,
    checks, logging, tracking); a plain loop of the same steps (the trainer's engine: forward, backward,
    optimizer step) fed by the same loader (`set_epoch`, the same workers); the plain loop over one epoch's
    batches held in memory. Returns steps/s per round of each."""
    from trainer import distributed
    from trainer.build import build
    from trainer.config import load_config
    from trainer.demo import write_digits_shards

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="throughput-trainer-") as tmp:
        write_digits_shards(os.path.join(tmp, "shards"))
        cfg = load_config("demo", [f"data.root={tmp}/shards", "data.prepare=none", f"run.output_dir={tmp}",
                                   "run.device=cpu", f"data.num_workers={args.trainer_workers}",
                                   f"train.epochs={10 ** 6}", "eval.at_start=false"])
        env = distributed.setup("cpu")
        trainer = build(cfg, env)
        engine, pos = trainer.engine, trainer.pos

        def plain(batches) -> int:
            n = 0
            for images, labels in batches:
                loss = engine(images, labels)
                engine.backward(loss)
                engine.step()
                n += 1
            return n

        def trainer_epoch() -> int:
            trainer.train_epoch()
            pos.epoch, pos.batch = pos.epoch + 1, 0
            return trainer.batches_per_epoch

        def loader_epoch() -> int:
            pos.epoch += 1  # the trainer's next epoch, fed to the plain loop
            return plain(trainer.loaders.train_batches.set_epoch(pos.epoch - 1))

        try:
            trainer_epoch()  # the loader and its workers start here (not timed)
            in_memory = list(trainer.loaders.train_batches.set_epoch(pos.epoch))
            feeds = {"trainer": trainer_epoch, "plain loop, same loader": loader_epoch,
                     "plain loop, tensors in memory": lambda: plain(in_memory)}
            plain(in_memory)
            rates: dict[str, list[float]] = {k: [] for k in feeds}
            for r in range(args.rounds):
                for name in (list(feeds) if r % 2 == 0 else list(feeds)[::-1]):
                    t0 = time.perf_counter()
                    steps = feeds[name]()
                    rates[name].append(steps / (time.perf_counter() - t0))
        finally:
            trainer.close()
            distributed.teardown()
    return {"rates": rates, "steps_per_epoch": trainer.batches_per_epoch, "workers": args.trainer_workers}


def trainer_report(res: dict) -> str:
    import statistics

    r = res["rates"]
    n = len(r["trainer"])
    lines = [f"demo (digits, small_cnn, batch 64, {res['steps_per_epoch']} steps/epoch, "
             f"{res['workers']} loader workers, persistent), CPU, torch threads 1; {n} rounds; "
             f"load average {load_average()}", "",
             "| feed | steps/s (median) | trainer / this: median of paired ratios | range |",
             "| --- | --- | --- | --- |"]
    for name, rates in r.items():
        ratios = [a / b for a, b in zip(r["trainer"], rates)]
        lines.append(f"| {name} | {statistics.median(rates):.2f} | {statistics.median(ratios):.2f} | "
                     f"{min(ratios):.2f}-{max(ratios):.2f} |")
    return "\n".join(lines)


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="", help="a train split dir of shards (default: generate one)")
    p.add_argument("--backbone", default="resnet50", help="timm name | bninception | small_cnn")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize-size", type=int, default=256)
    p.add_argument("--workers", default="1,4,8,16", help="comma-separated loader worker counts")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--classes", type=int, default=100, help="classes of the generated dataset")
    p.add_argument("--source-height", type=int, default=375, help="generated JPEG height")
    p.add_argument("--source-width", type=int, default=500, help="generated JPEG width")
    p.add_argument("--trainer", action="store_true",
                   help="instead: the demo's Trainer.train_epoch vs a plain loop on the same loader vs in memory")
    p.add_argument("--trainer-workers", type=int, default=1, help="loader workers of the --trainer run")
    p.add_argument("--rounds", type=int, default=6, help="rounds of the --trainer run (one epoch per feed)")
    args = p.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        p.error(f"--workers: comma-separated integers, got {args.workers!r}")
    if min(args.workers) < 0 or args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--workers >= 0, --steps >= 1, --warmup >= 0 and --batch-size >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.trainer:
        res = trainer_vs_plain(args)
        print(trainer_report(res))
        return res
    res = run(args)
    print(report(args, res))
    for r in res["rows"]:
        print(f"device path, {r['workers']} workers: {r['device_stats']}")
    return res


if __name__ == "__main__":
    main()
