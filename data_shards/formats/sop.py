"""Stanford Online Products: `Stanford_Online_Products/` with Ebay_train.txt and Ebay_test.txt
(`image_id class_id super_class_id path`; 11,318 train and 11,316 test classes). A class is named
after its product: `bicycle_final/111085122871`."""

import os

from ..errors import DataError
from . import Record, require


def read_list(root: str, name: str) -> list[Record]:
    path = require(os.path.join(root, name), "sop --src")
    with open(path, encoding="utf-8") as f:
        header = f.readline().split()
        if header[:4] != ["image_id", "class_id", "super_class_id", "path"]:
            raise DataError(f"sop: {path} does not start with 'image_id class_id super_class_id path'")
        records = []
        for n, line in enumerate(f, 2):
            if not line.strip():
                continue
            try:
                image_id, class_field, super_id, rel = line.split()
                extra = {"image_id": int(image_id), "super_class_id": int(super_id)}
                class_id = int(class_field)
            except ValueError:
                raise DataError(f"sop: {path} line {n} is not 'image_id class_id super_class_id path': "
                                f"{line.strip()[:80]!r}") from None
            product = rel.rsplit("/", 1)
            name = product[0] + "/" + product[-1].rsplit("_", 1)[0]
            records.append(Record(os.path.join(root, rel), rel, class_id, name, extra))
    return records


def collect(src: str) -> dict[str, list[Record]]:
    root = src
    if not os.path.isfile(os.path.join(root, "Ebay_train.txt")):
        root = os.path.join(src, "Stanford_Online_Products")
    return {"train": read_list(root, "Ebay_train.txt"), "test": read_list(root, "Ebay_test.txt")}
