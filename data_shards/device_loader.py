"""The decode switch, end to end: `decode` cpu | gpu in, batches on the training device out.

    check_decode("gpu", device)                  # data_shards/decode.py: ValueError naming data.decode
    loader = train_loader(split, ..., options=LoaderOptions(decode="gpu", device=device))   # a DeviceLoader
    for images, labels in loader: ...            # on `device`, whichever decoder made them

cpu: the loader workers decode and augment (data_shards/transforms.py); the batches are copied to the device.
gpu: the workers only read the encoded bytes; data_shards/gpu_transforms.py decodes (nvJPEG) and augments them on
the device, batch b+1 on a side stream while step b runs. The trainer never sees which one ran.
"""
from __future__ import annotations

import torch


class DeviceLoader:
    """A shard loader (data_shards.loaders.ShardLoader) whose batches arrive on `device`: `(images, labels)` for
    training, `(images, labels, keys)` for evaluation; `len`, `set_epoch`, `close` as the shard loader's.
    gpu: `seed` seeds the device augmentation with the epoch and batch position (a resumed run draws the same)."""

    def __init__(self, loader, decode: str, device: torch.device, transform, train: bool, seed: int | None = None):
        self.loader, self.decode, self.device = loader, decode, torch.device(device)
        self.transform, self.train, self.seed = transform, train, seed

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> DeviceLoader:
        self.loader.set_epoch(epoch, start_batch)
        return self

    def close(self) -> None:
        self.loader.close()

    def __iter__(self):
        if self.decode == "gpu":
            from data_shards.gpu_transforms import device_batches
            yield from device_batches(self.loader, self.transform, self.device, train=self.train, seed=self.seed)
            return
        dev = self.device
        for images, labels, *keys in self.loader:
            yield (images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True), *keys)
