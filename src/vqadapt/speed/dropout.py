"""Dropout with a fast mask on CPUs where PyTorch's is slow.

PyTorch draws CPU dropout masks with ``bernoulli_``, which takes a vectorised MKL path on
Intel CPUs only; elsewhere (AMD here) it draws one double per element through a serial
Mersenne twister, about 6 ns per element, and dropout was the largest single cost of a
text-LoRA step (LoRA dropout on q, k and v of every layer, on every token). Here the mask comes
from numpy's PCG64 as 16-bit integers (four per raw 64-bit draw, about 1 ns each): an element
is kept when its integer is at least ``round(p * 65536)``, so the drop probability is ``p`` to
within 2^-17, and kept elements are scaled by ``1 / (1 - p)`` as in
``torch.nn.functional.dropout``.

Each call seeds its generator with a number drawn from torch's default generator, so runs stay
deterministic under ``torch.manual_seed`` and resume exactly from a saved torch RNG state.
Tensors on other devices (CUDA's dropout is fast) take ``torch.nn.functional.dropout``.
Installed by ``vqadapt.speed`` where the CPU profile asks for it: the packed text encoder and
the lean decoder call ``dropout``, and ``use_fast_dropout`` swaps the projector's and the LoRA
dropout modules for ``Dropout``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LEVELS = 1 << 16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool tensor, True with probability 1 - p (to within 2^-17)."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    count = math.prod(shape)
    # Raw 64-bit outputs read as four 16-bit integers each: twice as fast as
    # Generator.integers, whose bounded-integer loop costs more than the draws.
    raw = np.random.PCG64(seed).random_raw(-(-count // 4)).view(np.uint16)[:count]
    return torch.from_numpy(raw >= round(p * LEVELS)).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``torch.nn.functional.dropout(x, p, training)``, with the fast mask on CPU."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or not 0 < p < 1:
        return F.dropout(x, p, training)
    return x * keep_mask(x.shape, p).to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the fast mask (same ``p``, same ``state_dict``: none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def use_fast_dropout(module: nn.Module, fast: bool = True) -> int:
    """Swap every plain ``nn.Dropout`` under ``module`` for ``Dropout`` (or, with ``fast``
    False, every ``Dropout`` back); returns how many were swapped."""
    old, new = (nn.Dropout, Dropout) if fast else (Dropout, nn.Dropout)
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is old:
                replacement = new(child.p, child.inplace)
                replacement.train(child.training)  # keep the module's mode
                setattr(parent, name, replacement)
                swapped += 1
    return swapped
