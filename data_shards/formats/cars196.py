"""Cars196 (Stanford Cars): `car_ims/` + `cars_annos.mat` (read with scipy.io). The .mat holds
`annotations` (struct array: relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, test) and
`class_names`. Classes 1-98 are the train split, 99-196 the test split (the official `test` flag is kept
in each sample's json but not used for the split, as in deep metric learning papers)."""

import os

import numpy as np
import scipy.io

from ..errors import DataError
from . import Record, require


def collect(src: str, train_classes: int = 98) -> dict[str, list[Record]]:
    mat_path = require(os.path.join(src, "cars_annos.mat"), "cars196 --src")
    try:
        mat = scipy.io.loadmat(mat_path, squeeze_me=True)
    except (ValueError, TypeError, OSError) as exn:
        raise DataError(f"cars196: cannot read {mat_path} ({exn}); download cars_annos.mat again") from None
    for key in ("annotations", "class_names"):
        if key not in mat:
            raise DataError(f"cars196: {mat_path} has no {key!r}")
    names = [str(n) for n in np.atleast_1d(mat["class_names"])]
    splits: dict[str, list[Record]] = {"train": [], "test": []}
    for a in np.atleast_1d(mat["annotations"]):
        try:
            rel, cid, test = str(a["relative_im_path"]), int(a["class"]), int(a["test"])
            bbox = [int(a[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")]
        except (ValueError, IndexError, TypeError) as exn:
            raise DataError(f"cars196: an annotation of {mat_path} lacks a field ({exn})") from None
        if not 1 <= cid <= len(names):
            raise DataError(f"cars196: {rel} has class {cid} outside 1..{len(names)}")
        rec = Record(os.path.join(src, rel), rel, cid, names[cid - 1], {"bbox": bbox, "test": test})
        splits["train" if cid <= train_classes else "test"].append(rec)
    return splits
