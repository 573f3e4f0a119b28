"""A new source layout is one file (tests/data_shards/toy_format.py) and one registration line: it is then a
format of write_dataset and of `python -m data_shards write`, and its shards read like any other's."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_shards import read_manifest, write_dataset
from data_shards.__main__ import main as cli_main
from data_shards.formats import formats, register_format, unregister_format
from tests.data_shards import toy_format
from tests.data_shards.test_data_layouts import check_split


@pytest.fixture
def csvlist():
    register_format("csvlist", toy_format.collect)  # the one registration line
    yield "csvlist"
    unregister_format("csvlist")


def make_source(root) -> dict:
    """2 train and 2 test classes of 3 real PNGs each, listed in labels.csv; {relative path: class name}."""
    rng = np.random.default_rng(0)
    listed = {}
    lines = []
    for split, names in (("train", ("ant", "bee")), ("test", ("cat", "dog"))):
        for name in names:
            for i in range(3):
                rel = f"images/{name}_{i}.png"
                os.makedirs(os.path.join(root, "images"), exist_ok=True)
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buf, format="PNG")
                with open(os.path.join(root, rel), "wb") as f:
                    f.write(buf.getvalue())
                listed[rel] = name
                lines.append(f"{split},{name},{rel}")
    with open(os.path.join(root, "labels.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return listed


def test_a_registered_format_writes_shards_that_read_back(csvlist, tmp_path):
    listed = make_source(tmp_path / "src")
    assert formats()[-1] == "csvlist" and "cub200" in formats()
    summary = write_dataset(csvlist, tmp_path / "src", tmp_path / "out", shard_size="4kB", workers=1,
                            progress=False)
    assert {s: (v["num_samples"], v["num_classes"]) for s, v in summary.items()} == {"train": (6, 2),
                                                                                     "test": (6, 2)}
    for split, class_ids in (("train", [0, 1]), ("test", [2, 3])):
        samples = check_split(str(tmp_path / "out" / split), 6, class_ids)  # read with tarfile, checked
        assert os.path.basename(read_manifest(tmp_path / "out" / split).shards[0]).startswith("csvlist-")
        for sample in samples:
            meta = json.loads(sample["json"])
            assert listed[meta["path"]] == meta["class_name"]
            with open(tmp_path / "src" / meta["path"], "rb") as f:
                assert f.read() == sample["png"]  # the bytes as they were


def test_the_cli_offers_a_registered_format(csvlist, tmp_path, capsys):
    make_source(tmp_path / "src")
    assert cli_main(["write", "csvlist", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                     "--no-progress", "--workers", "1"]) == 0
    assert "train: written: 6 images, 2 classes" in capsys.readouterr().out
    unregister_format("csvlist")
    with pytest.raises(SystemExit):  # an unregistered name is refused by the command line
        cli_main(["write", "csvlist", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "p")])


@pytest.mark.parametrize("fmt,option,takes", [("csvlist", "--train-classes", "none of them"),
                                              ("sop", "--train-classes", "none of them"),
                                              ("cub200", "--test-classes", "--train-classes")])
def test_a_split_option_the_format_does_not_take_is_one_clear_line(csvlist, tmp_path, capsys, fmt, option, takes):
    make_source(tmp_path / "src")
    code = cli_main(["write", fmt, "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o"), option, "3",
                     "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"python -m data_shards write: error: {option}: the {fmt} format does not take it "
                                 f"(it takes {takes})"]
    assert not (tmp_path / "o").exists()  # nothing written
