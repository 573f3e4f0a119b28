"""The val split of `data_shards write` (whole classes taken out of the train classes, never the test classes,
seeded, recorded in the manifests), the folds of a search and splits re-cut from written shards."""
import json
import os
import subprocess
import sys

import pytest

from data_shards import DataError, read_manifest, write_dataset
from data_shards.holdout import class_folds, pick_val_classes, write_class_splits
from data_shards.tar_reader import tar_samples

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRAIN, TEST = [str(d) for d in range(5)], [str(d) for d in range(5, 10)]


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
    from trainer.demo import write_digit_folders
    src = tmp_path_factory.mktemp("digit-png")
    write_digit_folders(str(src))
    return str(src)


def labels_and_classes(split_dir):
    """{class name: sample count} read from the shards themselves (labels through the manifest's names)."""
    m = read_manifest(split_dir)
    counts = {}
    for url in m.shards:
        for s in tar_samples(url, handler=lambda e: False):
            name = m.class_names[int(s["cls"])]
            assert json.loads(s["json"])["class_name"] == name
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_val_fraction_takes_whole_train_classes_disjoint_from_test_and_train(digit_folders, tmp_path):
    out = tmp_path / "a"
    write_dataset("folder", digit_folders, out, train_classes=TRAIN, test_classes=TEST, shard_size="64KB",
                  progress=False, val_fraction=0.4, val_seed=3)
    train, val, test = (labels_and_classes(out / s) for s in ("train", "val", "test"))
    assert len(val) == 2 and set(val) < set(TRAIN)                       # round(0.4 x 5) train classes
    assert not set(val) & set(test) and not set(val) & set(train)         # disjoint from test and from train
    assert set(train) | set(val) == set(TRAIN) and set(test) == set(TEST)
    assert sum(train.values()) + sum(val.values()) == 901                 # every train image, once
    for split in ("train", "val"):
        m = read_manifest(out / split)
        assert m.raw["val_classes"] == sorted(val) and m.raw["val_seed"] == 3
    assert "val_classes" not in read_manifest(out / "test").raw
    again = tmp_path / "b"  # the same seed, the same classes; another seed may differ but is still valid
    write_dataset("folder", digit_folders, again, train_classes=TRAIN, test_classes=TEST, shard_size="64KB",
                  progress=False, val_fraction=0.4, val_seed=3)
    assert read_manifest(again / "val").class_names == read_manifest(out / "val").class_names
    choices = {tuple(pick_val_classes([(i, n) for i, n in enumerate(TRAIN)], val_fraction=0.4, seed=s))
               for s in range(10)}
    assert len(choices) > 1 and all(set(c) < set(TRAIN) and len(c) == 2 for c in choices)


def test_val_classes_by_name_and_cli_refuses_test_classes(digit_folders, tmp_path):
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "data_shards", "write", "folder", "--src", digit_folders, "--out", str(out),
           "--train-classes", ",".join(TRAIN), "--test-classes", ",".join(TEST), "--shard-size", "64KB",
           "--no-progress"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    bad = subprocess.run([*cmd, "--val-classes", "1,7"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "test classes" in bad.stderr and "'7'" in bad.stderr, bad.stderr
    assert not os.path.exists(out / "val")
    good = subprocess.run([*cmd, "--val-classes", "1,3"], env=env, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "val: written" in good.stdout
    assert read_manifest(out / "val").class_names == ["1", "3"]
    assert read_manifest(out / "train").class_names == ["0", "2", "4"]
    with pytest.raises(DataError, match="at least 2"):
        pick_val_classes([(i, n) for i, n in enumerate(TRAIN)], val_classes=["1"])


def test_folds_and_splits_recut_from_shards(digit_folders, tmp_path):
    folds = class_folds(TRAIN, 2, seed=1)
    assert sorted(sum(folds, [])) == TRAIN and not set(folds[0]) & set(folds[1])
    assert class_folds(TRAIN, 2, seed=1) == folds
    with pytest.raises(DataError):
        class_folds(TRAIN, 3)  # 5 classes: a fold of 1 val class
    write_dataset("folder", digit_folders, tmp_path / "src", train_classes=TRAIN, test_classes=TEST,
                  shard_size="64KB", progress=False)
    source = str(tmp_path / "src" / "train")
    counts = labels_and_classes(source)
    train = [c for c in TRAIN if c not in folds[0]]
    write_class_splits([source], tmp_path / "f", {"train": train, "val": folds[0]}, shard_size=32 << 10)
    got_train, got_val = labels_and_classes(tmp_path / "f" / "train"), labels_and_classes(tmp_path / "f" / "val")
    assert got_train == {c: counts[c] for c in train} and got_val == {c: counts[c] for c in folds[0]}
    m = read_manifest(tmp_path / "f" / "val")
    assert m.class_names == sorted(folds[0]) and len(m.shard_names) >= 2 and m.raw["derived_from"]
    with pytest.raises(DataError, match="two of the new splits"):
        write_class_splits([source], tmp_path / "x", {"train": TRAIN, "val": folds[0]})
