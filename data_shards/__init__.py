"""Datasets as webdataset shards (write.py, formats/) and the train / eval streams (stream.py)."""

from .errors import DataError
from .manifest import Manifest, read_manifest
from .stream import eval_loader, train_loader
from .transforms import TransformConfig
from .write import write_dataset

__all__ = ["DataError", "Manifest", "TransformConfig", "eval_loader", "read_manifest", "train_loader", "write_dataset"]
