"""The decode switch (`data.decode`): its values and the one check of a value against the machine, shared by the
loaders (data_shards/loaders.py, device_loader.py), the device decoder (gpu_transforms.py) and the config."""
from __future__ import annotations

import torch

DECODE_CHOICES = ("cpu", "gpu")  # the config's data.decode


def check_decode(decode: str, device: str | torch.device | None = None) -> None:
    """The one check of `data.decode` against the machine: raise ValueError naming the key when `gpu` cannot run
    on `device` (not CUDA, or no CUDA here) or the value is unknown."""
    if decode not in DECODE_CHOICES:
        raise ValueError(f"data.decode must be 'cpu' or 'gpu', got {decode!r}")
    if decode == "cpu":
        return
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"data.decode=gpu decodes JPEGs with nvJPEG on a CUDA device, but the device is "
                         f"{str(device)!r}; use data.decode=cpu or a cuda device")
    if not torch.cuda.is_available():
        raise ValueError("data.decode=gpu needs a CUDA GPU, but torch.cuda.is_available() is False on this "
                         "machine; use data.decode=cpu")
