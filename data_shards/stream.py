"""Train and eval streams over the shards of one split, for every rank and DataLoader worker.

Reading goes through webdataset (`tarfile_samples`: local paths, `pipe:` commands, http via curl); the
split of the data over ranks and workers is planned here from the manifest, so that:

- the shards, laid end to end (train: in an order and from a start seeded by (seed, epoch)), are cut
  into one piece per reader ("slot": `world_size * max(1, num_workers)` of them) of exactly the samples
  it needs; a shard may be split between readers (each skips the samples before its piece without
  decoding them). Unlike
  `wds.split_by_node`, no rank is ever empty or short whatever the shard count, and a rank sees other
  shards every epoch;
- train: every rank yields exactly `len(loader) = num_samples // (batch_size * world_size)` full batches.
  An epoch shows each sample at most once (the num_samples % (batch_size * world_size) left over change
  every epoch). A slot shuffles its samples with a seeded buffer and cuts batches (should samples turn
  out unreadable, it reads its pieces again to fill its batches); batch p of the rank comes from slot
  p % V, and DataLoader's in-order round robin over the workers puts them back in order p.
  Batch contents and augmentation are a function of (seed, epoch, rank, world_size) for a given
  batch_size and num_workers, so `start_batch=b` (skipping raw samples, no decoding) yields exactly
  batches b.. of the same epoch;
- train across epochs: `ShardLoader.set_epoch(epoch, start_batch)` moves one loader on (its stream reads the two
  numbers from shared memory at each iteration), giving exactly a new loader's batches; with persistent_workers
  the DataLoader keeps its workers, so an epoch starts without spawning them. Per sample a worker only decodes
  and crops (uint8, `TrainAugment`); the float conversion is done once per batch (`batch_to_float`);
- train with `sampler="m_per_class"` (class-balanced batches, the field's standard; the semantics of
  pytorch-metric-learning's MPerClassSampler): the same plan, the same slots and the same batch counts, but
  each slot reads its samples in windows of `window` batches (raw samples, labels read from `cls` without
  decoding) and regroups every window into batches of batch_size / m distinct classes with m samples each
  (`m_per_class_groups`: classes drawn with weights favouring unused samples, a class's samples reused only
  once all of them were used, as pml does for classes with fewer than m). Every per-rank batch is balanced
  (the per-rank batch must be a multiple of m; a window needs batch_size / m classes). The grouping is
  seeded by (seed, epoch, slot, window), so resume is exact here too: start_batch skips whole windows raw
  and regroups the window it starts in. Memory: one window of encoded samples per worker;
- eval: each sample is read by exactly one slot, once; the last batch of a slot may be short;
- a sample that cannot be read or decoded is skipped with a counted warning. In a train batch it is
  replaced by another sample of the same batch, so batch sizes and counts never change (no DDP hang);
- a shard that does not match its manifest (`verify`, data_shards/verify.py: checked when the loader is made
  and again at every shard open) raises DamagedShard. Raised in a loader worker, a DataError reaches the main
  process as an item of the stream, which ShardLoader raises there with its own short message.
"""

import contextlib
import itertools
import json
import logging
import math
import random
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .errors import DamagedShard, DataError, StoreUnavailable
from .manifest import Manifest
from .sampler import m_per_class_groups
from .tar_reader import tar_samples
from .transforms import TrainAugment, TransformConfig, batch_to_float, decode_image, eval_transform
from .verify import check_sample, check_size, rewrite_hint

log = logging.getLogger("data_shards")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
DECODES = ("cpu", "gpu", "none")  # the loaders' switch; "gpu" and "none": the workers only read the bytes
SAMPLERS = ("shuffle", "m_per_class")


@dataclass(frozen=True)
class Unit:
    """Samples start..stop-1 of shard `shard` (in the shard's order)."""
    shard: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def cut(counts: list[int], order: list[int], budgets: list[int], offset: int = 0) -> list[list[Unit]]:
    """Lay the shards end to end in `order`, start `offset` samples in (wrapping around), and cut that
    run of samples into consecutive pieces of `budgets[k]` samples, one per slot (a shard may be split
    between slots). The samples past sum(budgets) are not used."""
    run = [Unit(i, 0, counts[i]) for i in order if counts[i] > 0]
    for k, u in enumerate(run):
        if offset < u.size:
            run = [Unit(u.shard, u.start + offset, u.stop)] + run[k + 1:] + run[:k] + [Unit(u.shard, 0, offset)]
            break
        offset -= u.size
    plan: list[list[Unit]] = [[] for _ in budgets]
    slot, room = 0, budgets[0] if budgets else 0
    for u in run:
        pos = u.start
        while pos < u.stop and slot < len(budgets):
            take = min(room, u.stop - pos)
            if take:
                plan[slot].append(Unit(u.shard, pos, pos + take))
            pos, room = pos + take, room - take
            if room == 0:
                slot += 1
                room = budgets[slot] if slot < len(budgets) else 0
    return plan


class SkipCounter:
    """Counts and logs what is skipped: exceptions from the tar reader, undecodable samples."""

    def __init__(self, where: str):
        self.where, self.count = where, 0

    def skip(self, what: str, n: int = 1) -> None:
        self.count += n
        log.warning("data_shards: skipped %s (%d skipped so far by %s)", what, self.count, self.where)

    def handler(self, exn: Exception) -> bool:  # a webdataset handler: True = go on
        if isinstance(exn, (DataError, StoreUnavailable)):  # a missing object, a store down: never a shorter epoch
            raise exn
        self.skip(f"unreadable data: {exn!r}")
        return True


def read_unit(m: Manifest, unit: Unit, skips: SkipCounter, verify: bool = True):
    """The samples of one unit (data_shards/tar_reader.py: the samples before it are not read); a shard that ends
    before its manifest count (truncated) is reported. verify: the shard's size and first sample are checked
    against the manifest (raises DamagedShard)."""
    url = m.shard_url(unit.shard)
    if verify:
        check_size(m, unit.shard)
        if unit.start:  # the shard's first sample, as when the unit starts there
            with contextlib.closing(tar_samples(url, skips.handler)) as head:
                first = next(head, None)
            if first is not None:
                check_sample(m, unit.shard, first)
    samples = tar_samples(url, skips.handler, unit.start)
    if verify and not unit.start:
        samples = first_checked(m, unit.shard, samples)
    n = 0
    for sample in itertools.islice(samples, unit.size):
        n += 1
        yield sample
    if n < unit.size:
        skips.skip(f"{unit.size - n} of {unit.size} samples of {url} (samples {unit.start}..{unit.stop - 1}): "
                   "the shard ended early (truncated or unreadable)", unit.size - n)


def first_checked(m: Manifest, shard: int, samples):
    for k, sample in enumerate(samples):
        if k == 0:
            check_sample(m, shard, sample)
        yield sample


def handed_to_main(batches):
    """In a loader worker, a DataError (or StoreUnavailable) ends the stream as its last item instead of being
    raised: torch would re-raise it in the main process with the worker's traceback folded into its message.
    ShardLoader raises it."""
    try:
        yield from batches
    except (DataError, StoreUnavailable) as exn:
        if get_worker_info() is None:
            raise
        yield exn


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"no image field in sample {sample.get('__key__')} (fields {sorted(sample)})")


def label_of(sample: dict, m: Manifest) -> int:
    """The sample's class label (its `cls` field). Raises ValueError/KeyError on a missing or garbled field (the
    sample is skipped as unreadable) and DamagedShard on a label outside the manifest's classes: shards and
    manifest do not belong together (skipping such samples would train and evaluate on a silently smaller
    split, e.g. a manifest of fewer classes than its shards hold)."""
    label = int(sample["cls"])
    if not 0 <= label < m.num_classes:
        url = sample.get("__url__", "?")
        raise DamagedShard(f"damaged shard {url}: sample {sample.get('__key__')} has label {label}, outside the "
                           f"{m.num_classes} classes of {m.location}/manifest.json (shards and manifest of "
                           f"different writes?).\nRewrite the split: {rewrite_hint(m)}")
    return label


class EncodedBatch:
    """The encoded images of one batch (decode="none") as they cross from a loader worker to the main process:
    one flat uint8 tensor and the byte size of each image. A list of B tensors would cross as B shared-memory
    segments, each with its own file descriptor and pickling: with 2 workers the stream then delivered a third
    of its 0-worker rate (2026-11-29, 2-core machine: 1,045 against 3,178 images/s; packed: 2,238; see the
    decode=none rows of bench/data_bench.py). ShardLoader hands out `views()`, a list of B uint8 tensors that
    are views of `flat` (no copy)."""

    __slots__ = ("flat", "sizes")

    def __init__(self, blobs: list[bytes]):
        self.sizes = [len(b) for b in blobs]
        self.flat = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if sum(self.sizes) else \
            torch.empty(0, dtype=torch.uint8)

    def views(self) -> list[torch.Tensor]:
        return list(torch.split(self.flat, self.sizes))


class LabelList(list):
    """A batch's labels as they cross from a loader worker to the main process: a plain list, pickled by value.
    As a tensor they would cross as a shared-memory segment of their own, whose file descriptor the main process
    fetches through a socket handshake with the worker (torch's file_descriptor strategy), for 256 bytes: with 2
    workers that was about a third of the main process's CPU time per batch. ShardLoader makes them int64 again."""

    __slots__ = ()

    def __reduce__(self):
        return LabelList, (list(self),)


def batch_labels(labels) -> LabelList | torch.Tensor:
    """A batch's int labels as the stream yields them: a LabelList in a loader worker, else int64 (B,)."""
    return LabelList(labels) if get_worker_info() is not None else torch.tensor(labels, dtype=torch.int64)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass(frozen=True)
class Sampling:
    """How the train stream makes batches of the samples it reads.

    sampler: "shuffle" (a shuffle buffer of `shuffle_buffer` samples per reader) or "m_per_class": every batch
    holds batch_size / m_per_class classes with m_per_class samples each, grouped within windows of
    `sampler_window` batches per reader (the per-rank batch must be a multiple of m_per_class). draft: decode
    JPEGs at reduced size where the crop allows it (transforms.TrainAugment)."""
    sampler: str = "shuffle"
    m_per_class: int = 4
    sampler_window: int = 16
    shuffle_buffer: int = 1000
    draft: bool = False


class TrainStream(IterableDataset):
    """The batches of one rank for epoch `epoch` from batch `start_batch` on; `set_epoch` moves it to another
    (epoch, start_batch), which loader workers that live across epochs see at their next iteration (the two
    numbers are in shared memory). `slots_per_rank`: readers per rank (loader workers, at least 1); `decode`:
    "cpu" (decode and augment) or "none" (the encoded bytes)."""

    def __init__(self, m: Manifest, *, batch_size: int, seed: int, epoch: int, rank: int, world_size: int,
                 slots_per_rank: int, start_batch: int, transform: TransformConfig, decode: str,
                 verify: str = "quick", sampling: Sampling = Sampling()):
        super().__init__()
        self.sampler, self.m_per_class, self.window = sampling.sampler, sampling.m_per_class, sampling.sampler_window
        self.m, self.batch_size, self.seed = m, batch_size, seed
        self.rank, self.world_size, self.V = rank, world_size, slots_per_rank
        self.transform, self.decode, self.draft = transform, decode, sampling.draft
        self.shuffle_buffer, self.verify = sampling.shuffle_buffer, verify != "off"
        self.batches_per_epoch = batches_per_epoch(m.num_samples, batch_size * world_size)
        self.where = torch.tensor([epoch, start_batch], dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self.where[0])

    @property
    def start_batch(self) -> int:
        return int(self.where[1])

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.where.copy_(torch.tensor([epoch, start_batch]))

    def _tag(self, *more) -> str:
        return "/".join(map(str, (self.seed, self.epoch, self.world_size) + more))

    def plan(self) -> list[list[Unit]]:
        """Every slot's pieces of the shards for this epoch: shards in an order seeded by (seed, epoch),
        cut into exactly the samples each slot turns into batches (the same plan on every rank)."""
        rng = random.Random(self._tag("order"))
        order = list(range(len(self.m.shard_counts)))
        rng.shuffle(order)
        per_slot = [len(range(v, self.batches_per_epoch, self.V)) * self.batch_size for v in range(self.V)]
        return cut(self.m.shard_counts, order, per_slot * self.world_size, rng.randrange(self.m.num_samples))

    def slot_samples(self, slot: int, units: list[Unit], skips: SkipCounter):
        """Endless stream of raw samples of one slot: every cycle reads its units in a new seeded order
        through a seeded shuffle buffer, so a sample comes back only after all others of the slot."""
        urls = self.m.shards

        def read(order):
            for u in order:
                yield from read_unit(self.m, u, skips, self.verify)

        for cycle in itertools.count():
            order = list(units)
            random.Random(self._tag("slot", slot, cycle)).shuffle(order)
            rng = random.Random(self._tag("shuffle", slot, cycle))
            got = 0
            for sample in wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(read(order)):
                got += 1
                yield sample
            if got == 0:
                raise DataError(f"data_shards: no readable sample in shards "
                                f"{sorted({urls[u.shard] for u in units})}; check them with verify='sha256' "
                                "or rewrite the split (python -m data_shards write ... --overwrite)")

    def __iter__(self):
        return handed_to_main(self.batches())

    def batches(self):
        w, W = _worker()
        assert W == self.V, (W, self.V)
        L, B, b = self.batches_per_epoch, self.batch_size, self.start_batch
        v = (b + w) % self.V                       # round robin from worker 0 must start at batch b
        slot = self.rank * self.V + v
        units = self.plan()[slot]
        skips = SkipCounter(f"train rank {self.rank} worker {w}")
        samples = self.slot_samples(slot, units, skips)
        done_before = len(range(v, b, self.V))     # this slot's batches before start_batch
        tf = TrainAugment(self.transform, self.draft) if self.decode == "cpu" else None
        to_float = batch_to_float(self.transform) if tf is not None else None
        if self.sampler == "m_per_class":
            batches = self.balanced_batches(samples, slot, v, done_before, tf, skips)
        else:
            for _ in range(done_before * B):
                next(samples)
            batches = (self.make_batch(samples, p, tf, skips) for p in range(v + self.V * done_before, L, self.V))
        in_worker = get_worker_info() is not None
        for xs, labels in batches:
            yield (EncodedBatch(xs) if tf is None else to_float(xs, shared=in_worker)), batch_labels(labels)

    def balanced_batches(self, samples, slot: int, v: int, done_before: int, tf, skips: SkipCounter):
        """This slot's batches from its `done_before`-th on, each of batch_size / m classes x m samples: the slot's
        raw samples in windows of `window` batches, each window regrouped by `m_per_class_groups` (seeded by
        (seed, epoch, slot, window)); the windows before the one holding batch `done_before` are skipped raw."""
        L, B, K = self.batches_per_epoch, self.batch_size, self.window
        positions = list(range(v, L, self.V))  # this slot's batch positions in the rank's epoch
        first = done_before // K
        for _ in range(first * K * B):
            next(samples)
        for w in range(first, math.ceil(len(positions) / K)):
            count = min(K, len(positions) - w * K)
            raw = list(itertools.islice(samples, count * B))
            labels = []
            for s in raw:
                try:
                    labels.append(label_of(s, self.m))
                except DataError:
                    raise
                except Exception as exn:  # counted now; its place is filled like an undecodable sample's
                    skips.skip(f"sample {s.get('__key__')} of {s.get('__url__')}: {exn!r}")
                    labels.append(-1)
            keep = [i for i, y in enumerate(labels) if y >= 0]
            rng = random.Random(self._tag("m_per_class", slot, w))
            try:
                groups = m_per_class_groups([labels[i] for i in keep], count, B, self.m_per_class, rng)
            except ValueError as e:
                raise DataError(f"data_shards: {e} (train rank {self.rank}, epoch {self.epoch}); fewer classes "
                                "per batch (raise data.m_per_class or lower train.batch_size) or more classes per "
                                "window (raise data.sampler_window)") from None
            for j, group in enumerate(groups):
                if w * K + j >= done_before:
                    yield self.make_batch(iter([raw[keep[i]] for i in group]), positions[w * K + j], tf, skips)

    def make_batch(self, samples, position: int, tf, skips: SkipCounter):
        """Batch `position` of this epoch from the next batch_size raw samples: (list of B bytes: the augmented
        crops' (S, S, 3) uint8 pixels, or with tf None the encoded images; B int labels)."""
        B = self.batch_size
        for attempt in itertools.count(1):
            raw = list(itertools.islice(samples, B))
            items: list = []  # (bytes, label), None for a sample that could not be read
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash_seed(self._tag("aug", self.rank, position)))
                for s in raw:
                    try:
                        data, label = image_bytes(s), label_of(s, self.m)
                        items.append((data if tf is None else tf.crop_bytes(data), label))
                    except DataError:
                        raise
                    except Exception as exn:
                        skips.skip(f"sample {s.get('__key__')} of {s.get('__url__')}: {exn!r}")
                        items.append(None)
            good = [it for it in items if it is not None]
            if good:
                break
            if attempt == 10:
                raise DataError(f"data_shards: {10 * B} samples in a row of {self.m.location} were unreadable "
                                "(see the warnings above); rewrite the split (python -m data_shards write ...)")
            log.error("data_shards: a whole batch (%d samples) was unreadable; reading on", B)
        filled = [items[i] for i in fill_from_nearest([it is not None for it in items])]
        return [x for x, _ in filled], [lab for _, lab in filled]


class EvalStream(IterableDataset):
    def __init__(self, m: Manifest, batch_size, rank, world_size, slots_per_rank, transform, decode, verify="quick"):
        super().__init__()
        self.m, self.batch_size, self.rank, self.world_size = m, batch_size, rank, world_size
        self.V, self.transform, self.decode, self.verify = slots_per_rank, transform, decode, verify != "off"

    def plan(self) -> list[list[Unit]]:
        """The shards in manifest order cut into world_size * V pieces whose sizes differ by at most one."""
        n, slots = self.m.num_samples, self.world_size * self.V
        return cut(self.m.shard_counts, list(range(len(self.m.shard_counts))),
                   [n // slots + (k < n % slots) for k in range(slots)])

    def __iter__(self):
        return handed_to_main(self.batches())

    def batches(self):
        w, W = _worker()
        assert W == self.V, (W, self.V)
        slot = self.rank * self.V + w
        skips = SkipCounter(f"eval rank {self.rank} worker {w}")
        tf = eval_transform(self.transform) if self.decode == "cpu" else None
        batch = []
        for u in self.plan()[slot]:
            for s in read_unit(self.m, u, skips, self.verify):
                try:
                    data, label = image_bytes(s), label_of(s, self.m)
                    x = data if tf is None else tf(decode_image(data))
                    batch.append((x, label, sample_key(s)))
                except DataError:
                    raise
                except Exception as exn:
                    skips.skip(f"sample {s.get('__key__')} of {s.get('__url__')}: {exn!r}")
                    continue
                if len(batch) == self.batch_size:
                    yield self.collate(batch, tf)
                    batch = []
        if batch:
            yield self.collate(batch, tf)

    @staticmethod
    def collate(batch, tf):
        xs, labels, keys = zip(*batch)
        return (EncodedBatch(list(xs)) if tf is None else torch.stack(xs)), batch_labels(labels), list(keys)


def sample_key(sample: dict) -> str:
    """The original path stored by the writer (unique within a split), else the tar key."""
    if "json" in sample:
        try:
            return json.loads(sample["json"])["path"]
        except (ValueError, KeyError, TypeError):
            pass
    return sample["__key__"]


def batches_per_epoch(num_samples: int, global_batch: int) -> int:
    """Full batches per epoch on every rank: `num_samples // global_batch` (global = per-rank batch x ranks; the
    rest of the split changes every epoch). The one rule: the loaders, the build step and resume count with it."""
    return num_samples // global_batch


def hash_seed(tag: str) -> int:
    """A 63-bit seed from a text tag (the stream's and the device augmentation's random draws)."""
    return random.Random(tag).getrandbits(63)


def fill_from_nearest(good: list[bool]) -> list[int]:
    """The bad-sample rule of a train batch, for the CPU and the device decoders alike: for each position, the
    index of the sample that takes it, itself when good, else the nearest good one before it, else the first good
    one after it. The batch keeps its size (every rank steps in lockstep: no DDP hang). ValueError if none is good."""
    if not any(good):
        raise ValueError("no good sample in the batch")
    first = good.index(True)
    out, last = [], first
    for i, ok in enumerate(good):
        last = i if ok else last
        out.append(last)
    return out
