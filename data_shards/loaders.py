"""The loaders every rank iterates: `train_loader` (equal batch counts on every rank, exact resume) and
`eval_loader` (every sample once), as `ShardLoader`s over the streams of data_shards/stream.py, or as a
`DeviceLoader` (data_shards/device_loader.py) whose batches are on the training device."""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch

from .errors import DataError, StoreUnavailable
from .manifest import Manifest, read_manifest
from .sampler import classes_per_batch
from .stream import DECODES, SAMPLERS, EncodedBatch, EvalStream, LabelList, Sampling, TrainStream, batches_per_epoch
from .transforms import TransformConfig, as_transform_config
from .verify import VERIFY, verify_shards
from .workers import OPEN_LOADERS, make_dataloader, stop_workers


class ShardLoader:
    """An iterable of batches with `len()` = batches per epoch (train) or batches of this rank (eval).
    Iterating raises the DataError (e.g. DamagedShard) a worker met.

    Train: one iteration yields the batches start_batch.. of `epoch`; `set_epoch` moves it on, so that the
    same loader (and with persistent_workers its worker processes) serves every epoch."""

    def __init__(self, loader, length: int, manifest: Manifest, stream=None, verify: str = "off", **info):
        self.loader, self.length, self.manifest = loader, length, manifest
        self.stream, self.verify = stream, verify
        self.__dict__.update(info)
        OPEN_LOADERS.add(self)

    def close(self) -> None:
        """End the worker processes now (persistent workers otherwise live as long as the loader). Workers that
        do not stop within torch's grace period are killed: they ignore SIGTERM (data_shards/workers.py)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None:
            stop_workers(it)
            self.loader._iterator = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> ShardLoader:
        """Train loaders: the next iteration yields batches start_batch.. of `epoch`, exactly those a new
        train_loader(epoch=epoch, start_batch=start_batch) would; the shards are checked as when one is made
        (`verify`). Returns self. Raises ValueError (start_batch outside [0, len)), MissingData, DamagedShard."""
        if self.stream is None:
            raise TypeError("set_epoch: only train loaders have epochs")
        if not 0 <= start_batch < self.length:
            raise ValueError(f"set_epoch: start_batch must be in [0, {self.length}), got {start_batch!r}")
        verify_shards(self.manifest, self.verify, self.stream.rank, self.stream.world_size)
        self.stream.set_epoch(epoch, start_batch)
        self.epoch, self.start_batch = epoch, start_batch
        return self

    def __iter__(self):
        """The batches. Their worker processes start here, in the calling thread, not at the first batch: a worker
        asks for SIGKILL when the thread that forked it ends (PR_SET_PDEATHSIG follows the thread, see
        data_shards/workers.py), so persistent workers forked by a short-lived thread (the device decoder's
        producer) died with it. They are stopped when the iteration ends, raises or is closed, never left to the
        garbage collector (persistent workers: only when it raises, else at close()).

        Why: an iterator abandoned by an exception sits in a reference cycle (the traceback) until a gc pass,
        which finalizes its queues before torch's __del__ asks the workers to stop: the request is never sent,
        each worker costs a 5 s join (they ignore the SIGTERM that follows) and lives on; and a worker forked
        while such garbage exists may run that __del__ itself."""
        if self.stream is None and getattr(self, "iterated", False):  # eval, again: check as at construction
            verify_shards(self.manifest, self.verify, self.rank, self.world_size)
        self.iterated = True
        it = iter(self.loader)  # the workers start now, children of this thread
        return self._batches(it)

    def _batches(self, it):
        done = False
        try:
            for batch in it if self.stream is None else itertools.islice(it, self.length - self.stream.start_batch):
                if isinstance(batch, (DataError, StoreUnavailable)):
                    raise batch
                if isinstance(batch[0], EncodedBatch):
                    batch = (batch[0].views(), *batch[1:])
                if isinstance(batch[1], LabelList):
                    batch = (batch[0], torch.tensor(batch[1], dtype=torch.int64), *batch[2:])
                yield batch
            done = True
        except BaseException as exn:
            if not (isinstance(exn, GeneratorExit) and self.loader.persistent_workers):
                self._stop(it)
            raise
        if done and not self.loader.persistent_workers:
            self._stop(it)

    def _stop(self, it) -> None:
        stop_workers(it)
        if getattr(self.loader, "_iterator", None) is it:
            self.loader._iterator = None

    def __len__(self):
        return self.length


@dataclass(frozen=True)
class LoaderOptions:
    """How a loader reads, checks and decodes its shards: the same for a run's train and eval loaders.

    num_workers: loader worker processes (0: read in this process). decode: "cpu" (the workers decode and
    augment), "gpu" (they only read the bytes; decoded and augmented on `device`, which must be CUDA) or "none"
    (the bytes themselves). device: with it the loader is a data_shards.device_loader.DeviceLoader whose batches
    are on that device, whichever decoder made them. verify: "quick" (size and first sample of each shard),
    "sha256" (also every shard's hash, once per process) or "off"; see data_shards/verify.py.
    persistent_workers: the worker processes live from the first iteration to the loader's end, so an epoch (an
    evaluation) starts without spawning them."""
    num_workers: int = 2
    decode: str = "cpu"
    device: torch.device | str | None = None
    verify: str = "quick"
    pin_memory: bool = False
    prefetch_factor: int = 2
    persistent_workers: bool = False


def _options(options: LoaderOptions | None, sampling: Sampling | None, caller: str, **fields):
    """`options` and `sampling` (defaults when None) with `fields` replaced: the fields of both may be given as
    keywords of the loaders too (a shorthand for scripts and tests). TypeError for any other keyword."""
    options, sampling = options or LoaderOptions(), sampling or Sampling()
    own = {f.name for f in dataclasses.fields(LoaderOptions)}
    of_sampling = {f.name for f in dataclasses.fields(Sampling)} if caller == "train_loader" else set()
    unknown = set(fields) - own - of_sampling
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    options = dataclasses.replace(options, **{k: v for k, v in fields.items() if k in own})
    sampling = dataclasses.replace(sampling, **{k: v for k, v in fields.items() if k in of_sampling})
    return options, sampling


def _check(batch_size, num_workers, rank, world_size, decode, verify):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")


def train_loader(split_dir, batch_size: int, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 transform: TransformConfig | None = None, start_batch: int = 0, *,
                 options: LoaderOptions | None = None, sampling: Sampling | None = None, **fields):
    """Batches `(images float (B,3,H,W), labels int64 (B,))` of one rank for one epoch (decode="none":
    `(list of uint8 tensors of the encoded images, labels)`). `len()` is the same on every rank.

    `options` (LoaderOptions: workers, decode, device, verify) and `sampling` (Sampling: shuffle or m_per_class
    batches); their fields may also be given as keywords (`num_workers=0, sampler="m_per_class"`). With a
    device the loader is a data_shards.device_loader.DeviceLoader: the trainer's one entry (the device
    augmentation is seeded by seed + rank, epoch and batch position).

    The next epochs: `loader.set_epoch(epoch, start_batch)`, then iterate again (the same batches as a new
    loader for that epoch). Raises MissingData / BadManifest (read_manifest), DamagedShard (here or while
    iterating), DataError when the split gives no full batch, ValueError on bad arguments."""
    o, s = _options(options, sampling, "train_loader", **fields)
    _check(batch_size, o.num_workers, rank, world_size, o.decode, o.verify)
    if s.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {s.sampler!r}")
    if s.sampler == "m_per_class" and (classes_per_batch(batch_size, s.m_per_class) is None or s.sampler_window < 1):
        raise ValueError(f"m_per_class sampler: m_per_class={s.m_per_class!r} must divide the per-rank batch_size="
                         f"{batch_size} and sampler_window={s.sampler_window!r} must be >= 1")
    m = split_dir if isinstance(split_dir, Manifest) else read_manifest(split_dir)
    L = batches_per_epoch(m.num_samples, batch_size * world_size)
    if L == 0:
        raise DataError(f"train_loader: {m.num_samples} samples in {m.location} give no full batch of "
                        f"batch_size={batch_size} on world_size={world_size} ranks; lower the batch size")
    if not 0 <= start_batch < L:
        raise ValueError(f"train_loader: start_batch must be in [0, {L}), got {start_batch!r}")
    verify_shards(m, o.verify, rank, world_size)
    tf = as_transform_config(transform)
    stream = TrainStream(m, batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                         slots_per_rank=max(1, o.num_workers), start_batch=start_batch, transform=tf,
                         decode=_worker_decode(o.decode), verify=o.verify, sampling=s)
    loader = ShardLoader(_dataloader(stream, o), L, m, stream, o.verify, batches_per_epoch=L,
                         start_batch=start_batch, epoch=epoch)
    return _on_device(loader, o.decode, o.device, tf, train=True, seed=seed + rank)


def eval_loader(split_dir, batch_size: int, rank: int = 0, world_size: int = 1,
                transform: TransformConfig | None = None, *, options: LoaderOptions | None = None, **fields):
    """Batches `(images, labels, keys)`; over all ranks and workers every sample comes exactly once
    (counts per rank may differ). keys are the original image paths. options (or their fields as keywords)
    and errors: as train_loader. With persistent_workers the loader can be iterated again (each evaluation) by
    the same worker processes, until `close()`; the shards are checked again (`verify`) at each later
    iteration, as when a loader is made."""
    o, _ = _options(options, None, "eval_loader", **fields)
    _check(batch_size, o.num_workers, rank, world_size, o.decode, o.verify)
    m = split_dir if isinstance(split_dir, Manifest) else read_manifest(split_dir)
    verify_shards(m, o.verify, rank, world_size)
    V = max(1, o.num_workers)
    tf = as_transform_config(transform)
    stream = EvalStream(m, batch_size, rank, world_size, V, tf, _worker_decode(o.decode), o.verify)
    plan = stream.plan()
    per_slot = [sum(u.size for u in plan[rank * V + w]) for w in range(V)]
    length = sum(math.ceil(n / batch_size) for n in per_slot)
    loader = ShardLoader(_dataloader(stream, o), length, m, verify=o.verify, num_samples=sum(per_slot), rank=rank,
                         world_size=world_size)
    return _on_device(loader, o.decode, o.device, tf, train=False)


def _dataloader(stream, o: LoaderOptions):
    return make_dataloader(stream, o.num_workers, o.pin_memory, o.prefetch_factor, o.persistent_workers)


def _worker_decode(decode: str) -> str:
    """What the loader workers do: decode + augment ("cpu"), or only read the bytes ("none": gpu and none)."""
    return "cpu" if decode == "cpu" else "none"


def _on_device(loader: ShardLoader, decode: str, device, transform, train: bool, seed: int | None = None):
    if decode == "gpu" and device is None:
        raise ValueError("decode='gpu' needs the device the batches are decoded on (device=...)")
    if device is None:
        return loader
    from data_shards.decode import check_decode
    from data_shards.device_loader import DeviceLoader
    if decode == "none":
        raise ValueError("decode='none' yields encoded bytes: give no device, or decode='cpu' | 'gpu'")
    check_decode(decode, device)
    return DeviceLoader(loader, decode, device, transform, train, seed=seed if decode == "gpu" else None)


__all__ = ["LoaderOptions", "Sampling", "ShardLoader", "eval_loader", "train_loader"]
