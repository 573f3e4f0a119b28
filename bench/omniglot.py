"""Omniglot zero-shot retrieval: our standing quality check of the whole training path, on the CPU.

    python bench/omniglot.py [--minutes 18] [--work /tmp/omniglot-bench] [key=value ...]

1,623 handwritten characters x 20 drawers: --download fetches them with torchvision, --omniglot DIR takes
torchvision's folder (or a folder of the 1,623 character folders), --data SHARDS the shards of an earlier run;
without any of them the script says so in one line. Sorted class folders: the first 811 train, the other 812
test (never seen in training). The script writes shards with data_shards once (under --work), then in this same
run measures
  1. the raw-pixel floor (28x28 grey, ink 1 on 0, cosine kNN; the dataset README gives R@1 0.292),
  2. the untrained small CNN (random init, the trainer's evaluation before training),
  3. the small CNN trained with ProxyGML by `trainer` (preset trainer/configs/omniglot.yaml) within a fixed
     budget: after --minutes the trainer gets SIGUSR1 (the preemption path: checkpoint, clean stop), and
     the run is evaluated where it stands;
and prints Recall@1/2/4/8 and NMI of each on the 812 test classes.

Measured 2026-11-27 on a 2-core x86_64 CPU while other jobs ran (load average ~17), defaults
(`python bench/omniglot.py`, budget 16 min: 2 epochs of 126 steps fitted; the whole run 1,065 s):

| embedding | R@1 | R@2 | R@4 | R@8 | NMI | seconds |
| --- | --- | --- | --- | --- | --- | --- |
| raw pixels 28x28 (floor) | 0.320 | 0.413 | 0.504 | 0.596 | 0.611 | 160 |
| small CNN, untrained | 0.146 | 0.212 | 0.291 | 0.378 | 0.590 | - |
| small CNN + ProxyGML, 254 steps | 0.486 | 0.599 | 0.707 | 0.796 | 0.720 | 905 |

trained / raw-pixel R@1: 1.52x. On an idle machine the same budget fits several times more epochs.

Measured again on the idle machine (load average ~1; 2 threads): the preset's 20 epochs (2,520 steps) finish
in 337 s, inside the budget; whole run 371 s:

| embedding | R@1 | R@2 | R@4 | R@8 | NMI | seconds |
| --- | --- | --- | --- | --- | --- | --- |
| raw pixels 28x28 (floor) | 0.320 | 0.413 | 0.504 | 0.596 | 0.611 | 11 |
| small CNN, untrained | 0.146 | 0.212 | 0.291 | 0.378 | 0.590 | - |
| small CNN + ProxyGML, 2520 steps | 0.764 | 0.856 | 0.916 | 0.954 | 0.870 | 337 |

trained / raw-pixel R@1: 2.39x (0.764 vs 0.320; the dataset README's encoding gives 0.292).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from quality import BenchInputError, data_shards_or_omniglot  # noqa: E402  (bench/ is on sys.path: the script's dir)

from data_shards import TransformConfig, eval_loader  # noqa: E402
from trainer import distributed  # noqa: E402
from trainer.build import build  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.evaluation.metrics import compute_metrics  # noqa: E402

COLUMNS = ["recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "nmi"]


def raw_pixel_metrics(shards: str) -> dict:
    """28x28 grey pixels, ink = 1 and paper = 0, as the embedding (cosine kNN): the floor any learned
    embedding must beat (ink = 0 on white paper gives a lower floor: cosine is then dominated by the paper)."""
    tf = TransformConfig(image_size=28, resize_size=28, mean=[0.0] * 3, std=[1.0] * 3)
    embs, labels = [], []
    for images, y, _ in eval_loader(os.path.join(shards, "test"), batch_size=512, num_workers=2, transform=tf):
        embs.append(torch.nn.functional.normalize(1.0 - images[:, 0].flatten(1), dim=1))
        labels.append(y)
    metrics, _ = compute_metrics(torch.cat(embs), torch.cat(labels), recall_ks=(1, 2, 4, 8), nmi=True,
                                 map_r=False)
    return metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="Omniglot shards already written by an earlier run (DIR/train, DIR/test)")
    p.add_argument("--omniglot", default="", help="Omniglot: torchvision's folder, a folder of its 1,623 character "
                                                 "folders, or one with the dataset's export.py")
    p.add_argument("--download", action="store_true", help="fetch Omniglot with torchvision into --work")
    p.add_argument("--work", default="/tmp/omniglot-bench")
    p.add_argument("--minutes", type=float, default=16.0,
                   help="budget up to the end of training (the final evaluation follows; the whole stays < 20)")
    p.add_argument("overrides", nargs="*", help="config overrides on top of the omniglot preset")
    args = p.parse_args()
    t_start = time.time()
    shards = data_shards_or_omniglot(args)
    prep_s, t_raw = time.time() - t_start, time.time()
    raw = raw_pixel_metrics(shards)
    t_raw = time.time() - t_raw

    cfg = load_config("omniglot", [f"data.root={shards}", f"run.output_dir={args.work}/runs",
                                   f"run.name=run-{int(time.time())}", "eval.at_start=true", *args.overrides])
    env = distributed.setup(cfg.run.device)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a timer firing just after training ends does no harm
    budget = max(60.0, args.minutes * 60 - (time.time() - t_start))
    timer = threading.Timer(budget, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    t_train = time.time()
    trainer = build(cfg, env)
    timer.start()
    trained = trainer.fit()
    timer.cancel()
    if trainer.pos.epoch < cfg.train.epochs:  # the budget ran out first: evaluate where training stands
        trained = trainer.evaluate(f"budget reached at epoch {trainer.pos.epoch} batch {trainer.pos.batch}")
    t_train = time.time() - t_train
    distributed.teardown()

    rows = [("raw pixels 28x28 (floor)", raw, t_raw), ("small CNN, untrained", trainer.first_metrics, None),
            (f"small CNN + ProxyGML, {trainer.pos.step} steps", trained, t_train)]
    print(f"\nOmniglot zero-shot, 812 test classes x 20 (train: 811 classes), {torch.get_num_threads()} threads; "
          f"data preparation {prep_s:.0f} s, total {time.time() - t_start:.0f} s")
    print("| embedding | R@1 | R@2 | R@4 | R@8 | NMI | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, m, secs in rows:
        seconds = "-" if secs is None else round(secs)
        print(f"| {name} | " + " | ".join(f"{m[c]:.3f}" for c in COLUMNS) + f" | {seconds} |")
    print(f"trained / raw-pixel R@1: {trained['recall_at_1'] / raw['recall_at_1']:.2f}x")


if __name__ == "__main__":
    try:
        main()
    except BenchInputError as e:
        print(f"bench/omniglot.py: {e}", file=sys.stderr)
        sys.exit(2)
