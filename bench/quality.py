"""Retrieval quality of ProxyGML against well-known losses, its ablation and its N / r studies, in one trainer.

    python bench/quality.py [--mode compare|ablation|sweep-n|sweep-r] [--entries A,B] [--seeds 2]
                            [--steps 160] [--budget-s 150] [--data SHARDS] [--work DIR] [key=value ...]

Every entry is trained by the project's trainer (`trainer.build.build(cfg, env).fit()`, in this process, one after the
other) from the same preset (`--preset`, default trainer/configs/omniglot.yaml) with the same backbone, data,
schedule (`--steps` optimizer steps of the same global batch, constant learning rates) and time budget
(`--budget-s` seconds of training at most; an entry stopped by it is evaluated where it stands and its step
count is shown); only the `loss.*` keys differ (baselines: `loss.pml.name` = a pytorch-metric-learning class,
trained through loss/baselines.py with the proxy lr on their own weights). Each entry runs with seeds
0..`--seeds`-1 (model init and data order); the table shows mean ± std over the seeds of Recall@1/2/4/8, NMI,
MAP@R on the test split and the training seconds, as markdown (printed and written to
`<out>/quality-<mode>.md`) and as a PNG bar chart (`<out>/quality-<mode>.png`); `<out>/quality-<mode>.json`
keeps every (entry, seed) result, `--resume` skips those already there, `--report-only` only redraws them.

Data: `--data DIR` (any shard set with DIR/train and DIR/test, written by `python -m data_shards write`), or
Omniglot: `--omniglot DIR` (torchvision's Omniglot folder, a folder of its 1,623 character folders, or one with
the dataset's export.py) or `--download` (torchvision fetches it); sorted class folders, the first 811 classes
train, the other 812 test (zero-shot), written to shards once under `--work`. Without any of them the script
says in one line what to pass.

Modes:
  compare   ProxyGML (the preset's N = 1, and N = 12 as in the paper's CUB/Cars recipe) vs NormalizedSoftmax,
            ProxyNCA, ProxyAnchor, SoftTriple, MultiSimilarity (+ its miner), Triplet (+ semi-hard miner).
            Default entries: ProxyGML N=12, NormalizedSoftmax, ProxyAnchor, MultiSimilarity (`--entries all`
            for all eight; `--entries ProxyGML,...` for N = 1).
  ablation  the paper's 8 rows: S^pos (loss.proxygml.pos_mask), M (loss.proxygml.class_mask), L^p
            (loss.proxygml.proxy_reg) on/off.
  sweep-n   proxies per class N (`--values 1,2,4`).
  sweep-r   share r of proxies kept per sample (`--values 0.01,0.05,0.1,0.2,0.4`).

Default budget, chosen so that the default run (4 entries x 2 seeds) fits in 30 minutes on the shared 2-core
development CPU even under the other jobs' load (load average 13-19: ~0.7 s per step, ~90 s per evaluation, so
8 x (110 + 90) s = 27 min; on the idle machine it takes a few minutes): one torch thread (`--threads`; under
that load one thread ran 3-4x faster than two), the omniglot preset's 32 px images and batch 128, but
`model.small_cnn_width=32`, 160 steps (1.26 epochs of the 16,220 training images), lrs constant, no warm-up,
evaluation on all 812 test classes (16,240 images, with NMI and MAP@R). Pair-based losses see random batches
(the data stream has no m-per-class sampler): about 10 positive pairs in a batch of 128 over 811 classes.

Measured (the default run, 2-core CPU, 281 s; more tables, the same comparison at equal wall-clock time where
ProxyAnchor and NormalizedSoftmax win, the ablation and the sweeps: bench/results/quality.md):

| entry | R@1 | R@2 | R@4 | R@8 | NMI | MAP@R | train s | steps |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
| ProxyGML N=12 | 52.6 ± 0.8 | 64.6 ± 0.8 | 75.2 ± 1.0 | 83.6 ± 0.9 | 74.1 ± 0.4 | 19.6 ± 0.4 | 45 ± 3 | 160 |
| NormalizedSoftmax | 36.8 ± 1.1 | 47.5 ± 1.1 | 58.5 ± 1.2 | 68.7 ± 1.1 | 66.7 ± 0.3 | 10.4 ± 0.3 | 18 ± 5 | 160 |
| ProxyAnchor | 45.9 ± 0.3 | 57.4 ± 0.1 | 68.3 ± 0.1 | 77.5 ± 0.1 | 71.1 ± 0.0 | 15.6 ± 0.0 | 19 ± 6 | 160 |
| MultiSimilarity | 18.1 ± 0.8 | 25.5 ± 1.1 | 34.4 ± 1.2 | 44.3 ± 1.1 | 60.7 ± 0.3 | 3.6 ± 0.2 | 15 ± 1 | 160 |
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COLUMNS = [("recall_at_1", "R@1"), ("recall_at_2", "R@2"), ("recall_at_4", "R@4"), ("recall_at_8", "R@8"),
           ("nmi", "NMI"), ("map_at_r", "MAP@R")]

BASELINES = {
    "ProxyGML": [],  # the preset's N = 1
    "ProxyGML N=12": ["loss.proxygml.proxies_per_class=12"],  # the paper's N for CUB-200 / Cars196
    "NormalizedSoftmax": ["loss.family=pml", "loss.pml.name=NormalizedSoftmaxLoss", "loss.pml.kwargs.temperature=0.05"],
    "ProxyNCA": ["loss.family=pml", "loss.pml.name=ProxyNCALoss", "loss.pml.kwargs.softmax_scale=10"],
    "ProxyAnchor": ["loss.family=pml", "loss.pml.name=ProxyAnchorLoss", "loss.pml.kwargs.margin=0.1",
                    "loss.pml.kwargs.alpha=32"],
    "SoftTriple": ["loss.family=pml", "loss.pml.name=SoftTripleLoss", "loss.pml.kwargs.centers_per_class=2"],
    "MultiSimilarity": ["loss.family=pml", "loss.pml.name=MultiSimilarityLoss", "loss.pml.kwargs.alpha=2",
                        "loss.pml.kwargs.beta=50",
                        "loss.pml.kwargs.base=0.5", "loss.pml.miner=MultiSimilarityMiner",
                            "loss.pml.miner_kwargs.epsilon=0.1"],
    "Triplet": ["loss.family=pml", "loss.pml.name=TripletMarginLoss", "loss.pml.kwargs.margin=0.1",
                "loss.pml.miner=TripletMarginMiner",
                "loss.pml.miner_kwargs.margin=0.1", "loss.pml.miner_kwargs.type_of_triplets=semihard"],
}
DEFAULT_COMPARE = ["ProxyGML N=12", "NormalizedSoftmax", "ProxyAnchor", "MultiSimilarity"]
DEFAULT_VALUES = {"sweep-n": "1,2,4", "sweep-r": "0.01,0.05,0.1,0.2,0.4"}


def entries_for(mode: str, names: str, values: str) -> dict[str, list[str]]:
    """{row name: loss overrides} of a mode; `names` picks rows (comma list, 'all', '' = the default)."""
    if mode == "compare":
        table = BASELINES
        default = DEFAULT_COMPARE
    elif mode == "ablation":
        table = {}
        for pos, mask, reg in itertools.product((False, True), repeat=3):
            name = "S^pos {} / M {} / L^p {}".format(*("on" if b else "off" for b in (pos, mask, reg)))
            table[name] = [f"loss.proxygml.pos_mask={pos}", f"loss.proxygml.class_mask={mask}",
                  f"loss.proxygml.proxy_reg={reg}"]
        default = list(table)
    else:
        key = "proxies_per_class" if mode == "sweep-n" else "r"
        table = {f"{'N' if mode == 'sweep-n' else 'r'}={v}": [f"loss.{key}={v}"]
                 for v in (values or DEFAULT_VALUES[mode]).split(",")}
        default = list(table)
    if names in ("", None):
        return {n: table[n] for n in default}
    picked = list(table) if names == "all" else [n.strip() for n in names.split(",")]
    unknown = [n for n in picked if n not in table]
    if unknown:
        raise SystemExit(f"--entries: unknown {unknown} for --mode {mode}; choose from {list(table)}")
    return {n: table[n] for n in picked}


OMNIGLOT_CLASSES = 1623
OMNIGLOT_HINT = ("give --data SHARDS (a shard set with SHARDS/train and SHARDS/test, from python -m data_shards "
                 "write), --omniglot DIR (torchvision's Omniglot folder, or a folder of the 1,623 character "
                 "folders), or --download (torchvision fetches Omniglot, about 10 MB, into --work)")


class BenchInputError(Exception):
    """What the user gave (or did not give) the script: said in one line, exit status 2."""


def _torchvision_alphabets(root: str) -> list[str] | None:
    """images_background and images_evaluation of torchvision's Omniglot layout under root (or root/omniglot-py)."""
    for base in (root, os.path.join(root, "omniglot-py")):
        parts = [os.path.join(base, p) for p in ("images_background", "images_evaluation")]
        if all(os.path.isdir(p) for p in parts):
            return parts
    return None


def omniglot_tree(omniglot: str, work: str, expected: int | None = OMNIGLOT_CLASSES) -> str:
    """A folder of one folder per character class, in the order whose first 811 train: the dataset's own export
    (a folder with export.py), torchvision's layout (alphabets/characters; background alphabets first, linked
    into <work>/classes), or a folder of class folders as it is. Raises BenchInputError saying what to give."""
    if not omniglot or not os.path.isdir(omniglot):
        raise BenchInputError(f"no Omniglot at {omniglot!r}: " + OMNIGLOT_HINT if omniglot else
                              "no Omniglot data: " + OMNIGLOT_HINT)
    if os.path.isfile(os.path.join(omniglot, "export.py")):
        tree = os.path.join(work, "png")
        if not os.path.isdir(tree):
            subprocess.run([sys.executable, os.path.join(omniglot, "export.py"), tree], check=True)
    elif (parts := _torchvision_alphabets(omniglot)) is not None:
        tree = os.path.join(work, "classes")
        os.makedirs(tree, exist_ok=True)
        for i, part in enumerate(parts):  # background alphabets (0) before evaluation ones (1)
            for alphabet in sorted(os.listdir(part)):
                for char in sorted(os.listdir(os.path.join(part, alphabet))):
                    link = os.path.join(tree, f"{i}_{alphabet}_{char}")
                    if not os.path.lexists(link):
                        os.symlink(os.path.abspath(os.path.join(part, alphabet, char)), link)
    else:
        tree = omniglot
    classes = [c for c in os.listdir(tree) if os.path.isdir(os.path.join(tree, c))]
    if expected is not None and len(classes) != expected:
        raise BenchInputError(f"--omniglot {omniglot}: expected {expected} character folders, found {len(classes)} "
                              f"in {tree}; " + OMNIGLOT_HINT)
    return tree


def download_omniglot(work: str) -> str:
    """Omniglot fetched by torchvision (background and evaluation sets) into <work>/download."""
    from torchvision.datasets import Omniglot

    root = os.path.join(work, "download")
    try:
        for background in (True, False):
            Omniglot(root, background=background, download=True)
    except OSError as e:  # no network, a proxy refusing: one line
        raise BenchInputError(f"--download: could not fetch Omniglot ({e}); " + OMNIGLOT_HINT) from None
    return root


def omniglot_shards(omniglot: str, work: str, download: bool = False) -> str:
    """Omniglot as shards (class-per-folder tree -> data_shards folder writer): first 811 classes train, 812 test."""
    from data_shards import write_dataset

    shards = os.path.join(work, "shards")
    if os.path.exists(os.path.join(shards, "test", "manifest.json")):
        return shards
    tree = omniglot_tree(download_omniglot(work) if download else omniglot, work)
    classes = sorted(c for c in os.listdir(tree) if os.path.isdir(os.path.join(tree, c)))
    write_dataset("folder", tree, shards, train_classes=classes[:811], test_classes=classes[811:],
                  shard_size="8MB", progress=False, name="omniglot")
    return shards


def data_shards_or_omniglot(args) -> str:
    """--data as given (checked), else Omniglot's shards from --omniglot or --download."""
    if args.data:
        if not os.path.isfile(os.path.join(args.data, "train", "manifest.json")):
            raise BenchInputError(f"--data {args.data}: no shard set there (no train/manifest.json); " + OMNIGLOT_HINT)
        return args.data
    return omniglot_shards(os.path.abspath(args.omniglot) if args.omniglot else "", args.work, args.download)


def schedule_overrides(args, shards: str) -> list[str]:
    """What every entry shares: data, backbone, schedule (steps, constant lrs), evaluation only at the end."""
    from data_shards import read_manifest

    cfg_batch = args.batch_size
    per_epoch = max(1, read_manifest(os.path.join(shards, "train")).num_samples // cfg_batch)
    epochs = args.steps // per_epoch + 2  # train.max_steps ends training before the last epoch
    return [f"data.root={shards}", "run.device=cpu" if args.cpu else "run.device=auto",
            f"run.output_dir={os.path.join(args.work, 'runs')}", f"train.batch_size={cfg_batch}",
            f"train.max_steps={args.steps}", f"train.epochs={epochs}", "train.warmup_epochs=0",
            "optim.lr_milestones=[]", "eval.every_epochs=0", "eval.at_start=false", "eval.nmi=true",
            "eval.map_r=true", "checkpoint.every_epochs=0", "checkpoint.resume=false", "checkpoint.keep_last=1",
            "tracking.enabled=false", f"model.small_cnn_width={args.width}"]


def run_entry(args, shared: list[str], loss_overrides: list[str], seed: int, env) -> dict:
    """Train one (entry, seed) with the trainer within the budget; evaluate; metrics + seconds + steps."""
    from trainer.build import build
    from trainer.config import load_config

    name = f"q-{int(time.time() * 1000)}"
    cfg = load_config(args.preset, [*shared, f"run.name={name}", f"run.seed={seed}", *loss_overrides,
                                    *args.overrides])
    trainer = build(cfg, env)
    timer = threading.Timer(args.budget_s, lambda: os.kill(os.getpid(), signal.SIGUSR1)) if args.budget_s else None
    t0 = time.perf_counter()
    if timer:
        timer.start()
    try:
        trainer.fit()  # stops at train.max_steps (or at the budget: SIGUSR1) with a checkpoint, before evaluating
    finally:
        if timer:
            timer.cancel()
    train_s = time.perf_counter() - t0
    metrics = trainer.evaluate(f"after {trainer.pos.step} steps")
    return {**{k: float(v) for k, v in metrics.items()}, "train_s": train_s, "steps": trainer.pos.step}


def summarize(results: list[dict], names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        runs = [r for r in results if r["entry"] == name]
        if not runs:
            continue
        row = {"entry": name, "seeds": len(runs), "steps": min(r["steps"] for r in runs)}
        for key in [c for c, _ in COLUMNS] + ["train_s"]:
            vals = np.array([r.get(key, np.nan) for r in runs], dtype=float)
            row[key] = (float(vals.mean()), float(vals.std()))  # population std over the seeds
        rows.append(row)
    return rows


def markdown(rows: list[dict], steps: int) -> str:
    head = "| entry | " + " | ".join(label for _, label in COLUMNS) + " | train s | steps |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 3)]
    for row in rows:
        one = row["seeds"] == 1  # no spread to show
        cells = [f"{row[c][0] * 100:.1f}" + ("" if one else f" ± {row[c][1] * 100:.1f}") for c, _ in COLUMNS]
        mean, std = row["train_s"]
        steps_cell = str(row["steps"]) + ("" if row["steps"] >= steps else " (budget)")
        secs = f"{mean:.0f}" + ("" if one else f" ± {std:.0f}")
        lines.append(f"| {row['entry']} | " + " | ".join(cells) + f" | {secs} | {steps_cell} |")
    return "\n".join(lines)


def bar_chart(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(COLUMNS) * len(rows) / 3), 4.2))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(COLUMNS))
    for i, row in enumerate(rows):
        means = [row[c][0] * 100 for c, _ in COLUMNS]
        stds = [row[c][1] * 100 for c, _ in COLUMNS]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=row["entry"])
    ax.set_xticks(x, [label for _, label in COLUMNS])
    ax.set_ylabel("% (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["compare", "ablation", "sweep-n", "sweep-r"], default="compare")
    p.add_argument("--entries", default="", help="comma list of row names, 'all', or '' for the mode's default")
    p.add_argument("--values", default="", help="sweep values, comma list")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=160, help="optimizer steps per entry (the shared schedule)")
    p.add_argument("--budget-s", type=float, default=150.0, help="training seconds per entry at most; 0 = none")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=32, help="model.small_cnn_width")
    p.add_argument("--preset", default="omniglot")
    p.add_argument("--data", default="", help="shard set (DIR/train, DIR/test); default: Omniglot from --omniglot")
    p.add_argument("--omniglot", default="", help="Omniglot: torchvision's folder, a folder of its 1,623 character "
                                                 "folders, or one with the dataset's export.py")
    p.add_argument("--download", action="store_true", help="fetch Omniglot with torchvision into --work")
    p.add_argument("--work", default="/tmp/quality-bench", help="Omniglot shards and the run directories")
    p.add_argument("--out", default="", help="where the table, chart and JSON go (default <work>/results)")
    p.add_argument("--resume", action="store_true", help="skip (entry, seed) pairs already in the JSON")
    p.add_argument("--report-only", action="store_true", help="no training: the table and chart of the JSON")
    p.add_argument("--cpu", action="store_true", help="run.device=cpu even where a GPU is present")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (on the loaded 2-core CPU one thread ran 3-4x faster than two); "
                        "0 = torch's default")
    p.add_argument("overrides", nargs="*", help="config key=value for every entry (e.g. data.num_workers=1)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.budget_s < 0:
        p.error("--seeds and --steps must be >= 1, --budget-s >= 0")
    return args


def train_all(args, entries: dict, shared: list[str], results: list[dict], json_path: str,
              tag: str = "quality") -> None:
    """Every (entry, seed) not yet in `results`, seed by seed from `args.first_seed` (default 0; a stopped run
    leaves whole seeds); the JSON is written after each run, with the run's wall time (evaluation included) and
    the load average before and after it. bench/birds50.py uses it too (tag: the printed prefix)."""
    import torch

    from trainer import distributed
    from trainer.config import load_config

    for overrides in entries.values():  # every entry's config is valid before the first one trains
        load_config(args.preset, [*shared, *overrides, *args.overrides])
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = distributed.setup("cpu" if args.cpu else "auto")
    # a budget timer firing just after an entry ended does no harm; the caller's handler comes back afterwards
    # (an ignored SIGUSR1 would be inherited by every process started later, which then could not trap it)
    old_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        first = getattr(args, "first_seed", 0)
        for seed in range(first, first + args.seeds):
            for name, overrides in entries.items():
                if any(r["entry"] == name and r["seed"] == seed for r in results):
                    continue
                load, t0 = os.getloadavg()[0], time.time()
                got = run_entry(args, shared, overrides, seed, env)
                result = {"entry": name, "seed": seed, "threads": torch.get_num_threads(), **got,
                          "wall_s": time.time() - t0, "load_before": load, "load_after": os.getloadavg()[0],
                          "overrides": overrides}
                results.append(result)
                print(f"[{tag}] {name} seed {seed}: R@1 {result.get('recall_at_1', float('nan')):.4f}, "
                      f"{result['steps']} steps, train {result['train_s']:.0f} s, wall {result['wall_s']:.0f} s, "
                      f"load {load:.1f}", flush=True)
                with open(json_path, "w") as f:
                    json.dump({"args": vars(args), "shared": shared, "results": results}, f, indent=1)
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)
        distributed.teardown()
        torch.set_num_threads(threads_before)


def earlier_results(args, json_path: str) -> list[dict]:
    """The results already in `json_path` with --resume or --report-only (else none). Raises SystemExit when
    --report-only finds none."""
    results = []
    if (args.resume or args.report_only) and os.path.exists(json_path):
        with open(json_path) as f:
            results = json.load(f)["results"]
    if args.report_only and not results:
        raise SystemExit(f"--report-only: no results in {json_path}")
    return results


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    entries = entries_for(args.mode, args.entries, args.values)
    out = args.out or os.path.join(args.work, "results")
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    json_path = os.path.join(out, f"quality-{args.mode}.json")
    results = earlier_results(args, json_path)
    if not args.report_only:
        shards = data_shards_or_omniglot(args)
        train_all(args, entries, schedule_overrides(args, shards), results, json_path)

    rows = summarize(results, list(entries))
    table = markdown(rows, args.steps)
    source = args.data or "Omniglot (811 train / 812 test classes)"
    seeds = max((row["seeds"] for row in rows), default=0)
    threads = sorted({r.get("threads", "?") for r in results if r["entry"] in entries}, key=str)
    title = (f"{args.mode}: {source}, {args.steps} steps x batch {args.batch_size}, small_cnn width {args.width}, "
             f"{seeds} seed(s), {'/'.join(map(str, threads))} thread(s)")
    when = "redrawn from the JSON" if args.report_only else f"total {time.time() - t_start:.0f} s"
    text = f"{title}; {when}\n\n{table}\n"
    print("\n" + text)
    with open(os.path.join(out, f"quality-{args.mode}.md"), "w") as f:
        f.write(text)
    bar_chart(rows, os.path.join(out, f"quality-{args.mode}.png"), title)
    return rows


if __name__ == "__main__":
    try:
        main()
    except BenchInputError as e:
        print(f"bench/quality.py: {e}", file=sys.stderr)
        sys.exit(2)
