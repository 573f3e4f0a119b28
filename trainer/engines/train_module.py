"""TrainModule: the embedder and the criterion in one nn.Module (images, labels -> scalar loss), so that DDP
all-reduces the proxies' gradients together with the network's; what every engine wraps."""
from __future__ import annotations

import torch
from torch import nn


class TrainModule(nn.Module):
    """images, labels -> scalar loss. The loss runs in float32 outside autocast.

    compile: the training forward of the embedder goes through torch.compile (one graph: training batches all
    have the same shape). Evaluation calls the embedder itself, eagerly: compiling it too cost two more graphs
    (no-grad, and the last, smaller batch), about a minute on the demo (H200 run); parameter names are
    unchanged, so checkpoints do not depend on it."""

    def __init__(self, embedder: nn.Module, criterion: nn.Module, compile: bool = False):
        super().__init__()
        self.embedder = embedder
        self.criterion = criterion
        self.compiled = torch.compile(embedder.forward) if compile else None  # a function, not a submodule

    def forward(self, images, labels):
        emb = (self.compiled or self.embedder)(images)
        with torch.autocast(emb.device.type, enabled=False):
            return self.criterion(emb.float(), labels)
