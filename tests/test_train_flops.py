"""FLOP counting for MFU: the trainer's count of a loss's forward FLOPs."""

from __future__ import annotations

import torch
from torch import nn

from avatarforge.train.runtime import forward_flops


def test_counts_every_matmul_including_modules_run_without_grad() -> None:
    student, teacher = nn.Linear(16, 32), nn.Linear(16, 32).requires_grad_(False)
    x = torch.randn(4, 16)

    def loss() -> torch.Tensor:
        h = student(x)  # output needs grad
        with torch.no_grad():  # a frozen teacher on an input that needs grad: PyTorch's module tracker fails here
            target = teacher(h[:, :16])
        return (h[:, :16] - target[:, :16]).pow(2).mean()

    # two [4, 16] x [16, 32] matmuls, 2 FLOPs per multiply-add
    assert forward_flops(loss) == 2 * (2 * 4 * 16 * 32)


def test_counts_nothing_for_elementwise_only() -> None:
    x = torch.randn(8, requires_grad=True)
    assert forward_flops(lambda: (x * 2).sum()) == 0
