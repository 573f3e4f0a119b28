"""A toy source layout, as a user would add one: `labels.csv` with lines `split,class_name,relative/path.png`.
One file with its collect(); registered with one line: register_format("csvlist", toy_format.collect)."""
import csv
import os

from data_shards.errors import DataError
from data_shards.formats import Record, require


def collect(src: str) -> dict[str, list[Record]]:
    path = require(os.path.join(src, "labels.csv"), "csvlist --src")
    splits: dict[str, list[Record]] = {}
    ids: dict[str, int] = {}
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) != 3:
                raise DataError(f"csvlist: {path} line {n} is not 'split,class_name,path'")
            split, name, rel = row
            splits.setdefault(split, []).append(Record(os.path.join(src, rel), rel, ids.setdefault(name, len(ids)),
                                                       name))
    return splits
