"""The expected data errors of data_shards: each message names the path and the fix, in one or two lines.

Every problem of the data itself (a missing split or source, a manifest that does not add up, a damaged or
foreign shard, a source that gives nothing to write) raises a `DataError`; entry points print it as one line
and exit 2 (`python -m data_shards`, the trainer). An object store that is down after every retry raises
`StoreUnavailable` (one line too, exit 1: the data may be fine). Anything else that escapes is a bug and keeps
its traceback.
"""


class DataError(ValueError):
    """An expected problem with the data (message: the path, what is wrong, the fix)."""


class MissingData(DataError, FileNotFoundError):
    """A split, its manifest.json, a shard or a source folder is not there (also a FileNotFoundError)."""


class BadManifest(DataError):
    """manifest.json is unreadable, of another format version, or does not add up."""


class DamagedShard(DataError):
    """A shard does not match its manifest: size, sha256, or its samples belong to another split."""


class StoreUnavailable(ConnectionError):
    """An object store (s3://) that kept failing after every retry: not a data problem (exit 1, not 2); the
    message names the object, the last failure and the way on (data_shards/object_store.py)."""


__all__ = ["DataError", "MissingData", "BadManifest", "DamagedShard", "StoreUnavailable"]
