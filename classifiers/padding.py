"""TensorFlow "same" padding frozen at one input size, as ``efficientnet_pytorch`` computes it.

timm's ``tf_*`` EfficientNets pad their strided convolutions for the size of each input ("same" padding,
recomputed per call). ``efficientnet_pytorch`` (the implementation the ICMR 2021 authors trained) instead fixes
those paddings once, for the model's nominal input size (380 px for B4), and applies the same zero padding
to inputs of every size. At other sizes the two differ: a 300 x 400 photo is padded differently in the last
strided stage and even yields a feature map of another height. `freeze_same_padding` makes a timm model pad
as efficientnet_pytorch does, so that converted weights compute the same features at every input size.

Where an axis needs an odd amount of padding, implementations split it differently (`PADDING_RULES`):

- ``tensorflow``: ``total // 2`` before, the rest after (TensorFlow, timm, ``efficientnet_pytorch>=0.7.1``);
- ``efficientnet_pytorch==0.7.0``: ``total - total // 2`` on *both* sides, one pixel more than asked for
  (its ``Conv2dStaticSamePadding`` pads ``(pad_w - pad_w // 2, pad_w - pad_w // 2, ...)``; 0.7.1 changed it).
  The B4 stem at 380 px gets ``(1, 1, 1, 1)`` here and ``(0, 1, 0, 1)`` under ``tensorflow``.

Weights reproduce their features only under the rule they were trained with; a frozen model records both the
size and the rule (``static_same_padding``, ``static_same_padding_rule``).
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ATTRIBUTE = "static_same_padding"
RULE_ATTRIBUTE = "static_same_padding_rule"
TENSORFLOW = "tensorflow"
EFFICIENTNET_PYTORCH_070 = "efficientnet_pytorch==0.7.0"
# How an odd total of "same" padding is split: total -> (before, after).
PADDING_RULES = {
    TENSORFLOW: lambda total: (total // 2, total - total // 2),
    EFFICIENTNET_PYTORCH_070: lambda total: (total - total // 2, total - total // 2),
}
# The rule of a model frozen before rules were recorded (a backbone.json without ``static_same_padding_rule``).
DEFAULT_RULE = TENSORFLOW


def check_padding_rule(rule: str) -> str:
    """``rule`` if it is one of `PADDING_RULES`.

    Raises:
        ValueError: an unknown rule, naming the valid ones.
    """
    if rule not in PADDING_RULES:
        raise ValueError(f"unknown padding rule {rule!r}; choose one of: {', '.join(PADDING_RULES)}")
    return rule


def same_padding(
    size: int, kernel: int, stride: int, dilation: int, *, rule: str = TENSORFLOW
) -> Tuple[int, int]:
    """``(before, after)`` zero padding of "same" for one axis of length ``size``, split by ``rule``."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return PADDING_RULES[check_padding_rule(rule)](total)


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


def freeze_same_padding(model: nn.Module, input_size: Sequence[int], *, rule: str = TENSORFLOW) -> nn.Module:
    """Replace the per-input "same" padding of ``model``'s convolutions by the padding they get for an input of
    ``input_size`` = ``(height, width)``, split by ``rule`` (`PADDING_RULES`) and kept for every input
    (efficientnet_pytorch's ``Conv2dStaticSamePadding``). Records ``input_size`` and ``rule`` on the model as
    ``static_same_padding`` and ``static_same_padding_rule``.

    The sizes each convolution sees are traced on the ``meta`` device (no computation).

    Raises:
        ValueError: ``input_size`` is not two positive integers, or ``rule`` is unknown.
    """
    check_padding_rule(rule)
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
            top, bottom = same_padding(
                height, conv.kernel_size[0], conv.stride[0], conv.dilation[0], rule=rule
            )
            left, right = same_padding(
                width, conv.kernel_size[1], conv.stride[1], conv.dilation[1], rule=rule
            )
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, StaticSamePadConv2d(conv, (left, right, top, bottom)))
    setattr(model, ATTRIBUTE, [size[0], size[1]])
    setattr(model, RULE_ATTRIBUTE, rule)
    return model
