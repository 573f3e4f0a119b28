"""Datasets as webdataset shards: writers, manifests, integrity checks, data errors, train / eval streams."""

from .decode import DECODE_CHOICES, check_decode
from .device_loader import DeviceLoader
from .errors import BadManifest, DamagedShard, DataError, MissingData
from .loaders import LoaderOptions, eval_loader, train_loader
from .manifest import Manifest, read_manifest
from .stream import Sampling, batches_per_epoch
from .transforms import TransformConfig
from .verify import VERIFY, verify_shards
from .write import write_dataset

__all__ = ["DECODE_CHOICES", "BadManifest", "DamagedShard", "DataError", "DeviceLoader", "LoaderOptions", "Manifest",
           "MissingData", "Sampling", "TransformConfig", "VERIFY", "batches_per_epoch", "check_decode", "eval_loader",
           "read_manifest", "train_loader", "verify_shards", "write_dataset"]
