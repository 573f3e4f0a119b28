"""A cheap screen of loss settings on birds50 before fine-tuning runs: frozen backbone, cached features.

    python bench/birds50_screen.py [--epochs 8] [--seeds 1] [--work /tmp/birds50-bench] [--out FILE.md] [NAME ...]

The ImageNet EfficientNet-Lite0 of bench/birds50.py embeds every train and test photo once (eval transform,
160 px center crop, pooled 1,280 features, cached in `--work`); then each row trains only the embedding layer
and the loss's own weights (proxies) on those features, batch 32, with the bench's optimizer settings, and is
evaluated on the 25 test species (Recall@1). Seconds per row instead of minutes: it ranks loss settings in the
frozen-backbone regime (the warm-up epoch's), which the fine-tuning runs of bench/birds50.py then confirm or
not; its numbers are not fine-tuning numbers. Rows: `ROWS` (config overrides of the loss and optim sections).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import birds50  # noqa: E402

A = ["model.embedding_init=torch_default"]
ROWS = {
    "authors (N 12, r 0.05)": [*A],
    "ProxyAnchor": ["loss.family=pml", "loss.pml.name=ProxyAnchorLoss", "loss.pml.kwargs.margin=0.1",
                    "loss.pml.kwargs.alpha=32"],
    "NormalizedSoftmax": ["loss.family=pml", "loss.pml.name=NormalizedSoftmaxLoss", "loss.pml.kwargs.temperature=0.05"],
    "scale 0.5": [*A, "loss.proxygml.scale=0.5"],
    "scale 3": [*A, "loss.proxygml.scale=3"],
    "r 0.2": [*A, "loss.proxygml.r=0.2"],
    "r 1": [*A, "loss.proxygml.r=1.0"],
    "r 0.2 scale 3": [*A, "loss.proxygml.r=0.2", "loss.proxygml.scale=3"],
    "N 1 r 1 scale 16": [*A, "loss.proxygml.proxies_per_class=1", "loss.proxygml.r=1.0", "loss.proxygml.scale=16"],
    "N 1 r 1 scale 32": [*A, "loss.proxygml.proxies_per_class=1", "loss.proxygml.r=1.0", "loss.proxygml.scale=32"],
    "N 1 r 0.2 scale 16": [*A, "loss.proxygml.proxies_per_class=1", "loss.proxygml.r=0.2", "loss.proxygml.scale=16"],
    "N 2 r 0.2 scale 8": [*A, "loss.proxygml.proxies_per_class=2", "loss.proxygml.r=0.2", "loss.proxygml.scale=8"],
    "N 4 r 0.2 scale 4": [*A, "loss.proxygml.proxies_per_class=4", "loss.proxygml.r=0.2", "loss.proxygml.scale=4"],
    "N 12 r 0.2 scale 2": [*A, "loss.proxygml.r=0.2", "loss.proxygml.scale=2"],
    "N 1 r 1 scale 16 lam 0": [*A, "loss.proxygml.proxies_per_class=1", "loss.proxygml.r=1.0",
                               "loss.proxygml.scale=16", "loss.proxygml.lam=0"],
    "N 1 r 1 scale 16 proxy lr 0.1": [*A, "loss.proxygml.proxies_per_class=1", "loss.proxygml.r=1.0",
                                      "loss.proxygml.scale=16",
                                      "optim.proxy_lr=0.1"],
}


def features(work: str, shards: str, weights: str, size: int = 160) -> dict:
    """{split: (features float32 (n, 1280), labels int64 (n,))}, computed once and cached."""
    path = os.path.join(work, f"features-{size}.pt")
    if os.path.exists(path):
        return torch.load(path)
    from data_shards import eval_loader
    from trainer.config import load_config
    from trainer.model import build_model

    cfg = load_config("cub200", birds50.shared_overrides(argparse.Namespace(image_size=size, cpu=True, work=work,
                                                                             epochs=4, amp="off"), shards, weights))
    model = build_model(cfg.model).eval()
    out = {}
    for split in ("train", "test"):
        xs, ys = [], []
        with torch.no_grad():
            for images, labels, _ in eval_loader(os.path.join(shards, split), 64, num_workers=1,
                                                 transform=cfg.data.transform):
                xs.append(model.pool(model.backbone(images)))
                ys.append(labels)
        out[split] = (torch.cat(xs), torch.cat(ys))
    torch.save(out, path)
    return out


def screen_row(feats: dict, overrides: list[str], epochs: int, seed: int) -> float:
    """Recall@1 on the test species after `epochs` of head + loss training on the cached train features."""
    from trainer.build import build_criterion, build_optimizer
    from trainer.config import load_config
    from trainer.evaluation.metrics import compute_metrics

    cfg = load_config("cub200", ["data.root=x", "model.backbone=small_cnn", "model.freeze_bn=false", *overrides])
    torch.manual_seed(seed)
    x_tr, y_tr = feats["train"]
    head = torch.nn.Linear(x_tr.shape[1], cfg.model.dim)
    if cfg.model.embedding_init == "kaiming_normal":
        torch.nn.init.kaiming_normal_(head.weight, mode="fan_out")
        torch.nn.init.zeros_(head.bias)
    crit = build_criterion(cfg.loss, int(y_tr.max()) + 1, cfg.model.dim)

    class HeadOnly(torch.nn.Module):  # the optimizer's three groups: no backbone, this head, the loss's weights
        def backbone_parameters(self):
            return []

        def head_parameters(self):
            return list(head.parameters())

    opt = build_optimizer(cfg.optim, HeadOnly(), crit)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x_tr), generator=gen)
        for a in range(0, len(order) - 31, 32):
            idx = order[a:a + 32]
            loss = crit(torch.nn.functional.normalize(head(x_tr[idx]), dim=1), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        x_te, y_te = feats["test"]
        metrics, _ = compute_metrics(head(x_te), y_te.numpy(), recall_ks=[1], nmi=False, map_r=False)
    return metrics["recall_at_1"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--work", default="/tmp/birds50-bench")
    p.add_argument("--out", default="")
    p.add_argument("rows", nargs="*", help="row names (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shards = birds50.birds50_shards(os.path.abspath(birds50.BIRDS50), args.work)
    weights = birds50.lite0_weights(os.path.join(args.work, "tf_efficientnet_lite0.pth"))
    feats = features(args.work, shards, weights)
    lines = [f"birds50 screen: frozen ImageNet EfficientNet-Lite0 features (160 px center crop), head + loss only, "
             f"{args.epochs} epochs of batch 32, seeds 0..{args.seeds - 1}, load {os.getloadavg()[0]:.1f}", "",
             "| row | R@1 (frozen features) | s |", "| --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for name in args.rows or list(ROWS):
        t0 = time.time()
        r1 = [screen_row(feats, ROWS[name], args.epochs, s) for s in range(args.seeds)]
        line = f"| {name} | {100 * np.mean(r1):.1f}" + (f" ± {100 * np.std(r1):.1f}" if len(r1) > 1 else "") + \
               f" | {time.time() - t0:.0f} |"
        lines.append(line)
        print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
