"""BN-Inception (Ioffe & Szegedy, "Batch Normalization", ICML 2015, arXiv:1502.03167), the backbone of the
ProxyGML paper, as a module of ours: its parameter and buffer names are those of the ImageNet weights file the
paper's code loads (Cadene's pretrained-models.pytorch port of the Caffe model, `bn_inception-52deb4733.pth`),
so that file loads into it tensor for tensor (`python -m trainer.weights fetch bninception --out FILE`).

    net = BNInception()
    fmap = net(images)        # images (B, 3, H, W) float, BGR, 0-255, minus MEAN -> (B, 1024, H/32, W/32)

The classifier of the file (`last_linear`, 1000 ImageNet classes) is not built: the embedder pools the feature
map itself. Layout: a stem (7x7/2 conv, max pool, 1x1 conv, 3x3 conv, max pool), then ten inception blocks
(`BLOCKS`); every conv is followed by its BatchNorm (`<name>_bn`) and a ReLU; pools use ceil mode as Caffe does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"
# the file's input convention (pretrained-models.pytorch's settings): BGR, pixel values 0-255, mean subtracted
MEAN, STD, CHANNEL_ORDER, PIXEL_SCALE = [104.0, 117.0, 128.0], [1.0, 1.0, 1.0], "bgr", 255.0
CLASSIFIER = "last_linear"
NUM_FEATURES = 1024

# block, input channels, 1x1, 3x3 reduce, 3x3, double 3x3 reduce, double 3x3, pool (avg | max), pool projection
# (0: the pooled input itself is concatenated), stride (2: a reduction block, which has no 1x1 branch)
BLOCKS = [
    ("3a", 192, 64, 64, 64, 64, 96, "avg", 32, 1),
    ("3b", 256, 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 320, 0, 128, 160, 64, 96, "max", 0, 2),
    ("4a", 576, 224, 64, 96, 96, 128, "avg", 128, 1),
    ("4b", 576, 192, 96, 128, 96, 128, "avg", 128, 1),
    ("4c", 576, 160, 128, 160, 128, 160, "avg", 128, 1),
    ("4d", 608, 96, 128, 192, 160, 192, "avg", 128, 1),
    ("4e", 608, 0, 128, 192, 192, 256, "max", 0, 2),
    ("5a", 1056, 352, 192, 320, 160, 224, "avg", 128, 1),
    ("5b", 1024, 352, 192, 320, 192, 224, "max", 128, 1),
]


class BNInception(nn.Module):
    """The feature extractor: (B, 3, H, W) -> (B, 1024, ceil(H/32), ceil(W/32)) for H, W >= 32 (224 -> 7)."""

    num_features = NUM_FEATURES

    def __init__(self):
        super().__init__()
        self._conv("conv1_7x7_s2", 3, 64, 7, stride=2)
        self._conv("conv2_3x3_reduce", 64, 64, 1)
        self._conv("conv2_3x3", 64, 192, 3)
        self.blocks = []  # (name, has 1x1, pool, has pool projection, stride): the forward's plan
        for name, cin, c1, c3r, c3, cdr, cd, pool, proj, stride in BLOCKS:
            p = f"inception_{name}_"
            if c1:
                self._conv(p + "1x1", cin, c1, 1)
            self._conv(p + "3x3_reduce", cin, c3r, 1)
            self._conv(p + "3x3", c3r, c3, 3, stride=stride)
            self._conv(p + "double_3x3_reduce", cin, cdr, 1)
            self._conv(p + "double_3x3_1", cdr, cd, 3)
            self._conv(p + "double_3x3_2", cd, cd, 3, stride=stride)
            if proj:
                self._conv(p + "pool_proj", cin, proj, 1)
            self.blocks.append((p, bool(c1), pool, bool(proj), stride))

    def _conv(self, name: str, cin: int, cout: int, k: int, stride: int = 1) -> None:
        """Register `name` (Conv2d with bias, 'same' padding for stride 1) and `name`_bn (BatchNorm2d)."""
        self.add_module(name, nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2))
        self.add_module(name + "_bn", nn.BatchNorm2d(cout))

    def _cbr(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.relu(getattr(self, name + "_bn")(getattr(self, name)(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._cbr("conv1_7x7_s2", x)
        x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        x = self._cbr("conv2_3x3", self._cbr("conv2_3x3_reduce", x))
        x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        for p, has_1x1, pool, has_proj, stride in self.blocks:
            branches = [self._cbr(p + "1x1", x)] if has_1x1 else []
            branches.append(self._cbr(p + "3x3", self._cbr(p + "3x3_reduce", x)))
            double = self._cbr(p + "double_3x3_1", self._cbr(p + "double_3x3_reduce", x))
            branches.append(self._cbr(p + "double_3x3_2", double))
            if pool == "avg":
                pooled = F.avg_pool2d(x, 3, stride=stride, padding=1, ceil_mode=True, count_include_pad=True)
            else:  # reduction blocks: 3x3/2 without padding; 5b: 3x3/1 with padding
                pooled = F.max_pool2d(x, 3, stride=stride, padding=1 if stride == 1 else 0, ceil_mode=True)
            branches.append(self._cbr(p + "pool_proj", pooled) if has_proj else pooled)
            x = torch.cat(branches, dim=1)
        return x
