"""TensorFlow "same" padding frozen at one input size, as ``efficientnet_pytorch`` computes it.

timm's ``tf_*`` EfficientNets pad their strided convolutions for the size of each input ("same" padding,
recomputed per call). ``efficientnet_pytorch`` (the implementation the ICMR 2021 authors trained) instead fixes
those paddings once, for the model's nominal input size (380 px for B4), and applies the same zero padding
to inputs of every size. At other sizes the two differ: a 300 x 400 photo is padded differently in the last
strided stage and even yields a feature map of another height. `freeze_same_padding` makes a timm model pad
as efficientnet_pytorch does, so that converted weights compute the same features at every input size.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ATTRIBUTE = "static_same_padding"


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> Tuple[int, int]:
    """``(before, after)`` zero padding of TensorFlow "same" for one axis of length ``size``."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class StaticSamePadConv2d(nn.Conv2d):
    """A convolution that applies a fixed zero padding ``(left, right, top, bottom)`` first; its tensors are
    those of the convolution it replaces (same names, same shapes)."""

    def __init__(self, conv: nn.Conv2d, pad: Tuple[int, int, int, int]):
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=0,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        self.weight = conv.weight
        if conv.bias is not None:
            self.bias = conv.bias
        self.static_pad = tuple(int(p) for p in pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.static_pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, static_pad={self.static_pad}"


def _dynamic_same_convs(model: nn.Module) -> Dict[str, nn.Conv2d]:
    """The convolutions of ``model`` that compute "same" padding per input (timm's ``Conv2dSame``)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and type(module).__name__ in ("Conv2dSame", "Conv2dSameExport")
    }


def freeze_same_padding(model: nn.Module, input_size: Sequence[int]) -> nn.Module:
    """Replace the per-input "same" padding of ``model``'s convolutions by the padding they get for an input of
    ``input_size`` = ``(height, width)``, kept for every input (efficientnet_pytorch's
    ``Conv2dStaticSamePadding``). Records ``input_size`` on the model as ``static_same_padding``.

    The sizes each convolution sees are traced on the ``meta`` device (no computation).

    Raises:
        ValueError: ``input_size`` is not two positive integers.
    """
    size = tuple(int(s) for s in input_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(
            f"static padding needs an input size (height, width) of positive integers, got {input_size!r}"
        )
    convs = _dynamic_same_convs(model)
    if convs:
        probe = copy.deepcopy(model).to("meta").eval()
        seen: Dict[str, Tuple[int, int]] = {}
        hooks = [
            module.register_forward_pre_hook(
                lambda mod, args, name=name: seen.__setitem__(name, tuple(args[0].shape[-2:]))
            )
            for name, module in _dynamic_same_convs(probe).items()
        ]
        with torch.no_grad():
            in_chans = next(m for m in probe.modules() if isinstance(m, nn.Conv2d)).in_channels
            probe(torch.empty((1, in_chans, *size), device="meta"))
        for hook in hooks:
            hook.remove()
        for name, conv in convs.items():
            height, width = seen[name]
            top, bottom = same_padding(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
            left, right = same_padding(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, StaticSamePadConv2d(conv, (left, right, top, bottom)))
    setattr(model, ATTRIBUTE, [size[0], size[1]])
    return model
