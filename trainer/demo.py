"""The embedded demo dataset: scikit-learn's 1,797 handwritten 8x8 digits, shipped inside scikit-learn.

    write_digits_shards(root)   # root/train (digits 0-4), root/test (digits 5-9): zero-shot retrieval

The images go through the same path as any real dataset: a class-per-folder PNG tree in a temporary
directory, then `data_shards.write_dataset("folder", ...)`. `python -m trainer` (config demo.yaml,
data.prepare=digits) calls this on the first run.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image

from data_shards import write_dataset

TRAIN_DIGITS = [str(d) for d in range(5)]
TEST_DIGITS = [str(d) for d in range(5, 10)]


def write_digit_folders(out: str) -> int:
    """out/<digit>/<index>.png, 8x8 grey, 0-16 ink scaled to 0-255; returns the image count."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = os.path.join(out, str(label))
        os.makedirs(folder, exist_ok=True)
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{i:04d}.png"))
    return len(digits.images)


def write_digits_shards(root: str, val_classes: list[str] | None = None) -> dict:
    """root/train, root/test (and root/val: `val_classes`, digits taken out of the train digits 0-4)."""
    with tempfile.TemporaryDirectory(prefix="digits-") as tmp:
        n = write_digit_folders(tmp)
        summary = write_dataset("folder", tmp, root, train_classes=TRAIN_DIGITS, test_classes=TEST_DIGITS,
                                shard_size="64KB", progress=False, name="digits", val_classes=val_classes)
    val = f", {','.join(val_classes)} val" if val_classes else ""
    print(f"demo: wrote {n} scikit-learn digits as shards under {root} (classes 0-4 train{val}, 5-9 test)")
    return summary
