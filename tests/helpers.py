"""Small builders shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

from hierbayes.tasks import TaskBatch


def tiny_mlp(hidden: int = 5, *, seed: int = 0) -> nn.Sequential:
    """A 1-``hidden``-1 tanh network (smooth, so finite differences behave)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def regression_batch(T: int = 4, N: int = 6, M: int = 5, d: int = 1, *, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, N, d, generator=g)
    xq = torch.randn(T, M, d, generator=g)
    w = torch.randn(T, d, 1, generator=g)
    ys = xs @ w + torch.sin(xs.sum(-1, keepdim=True)) + 0.1 * torch.randn(T, N, 1, generator=g)
    yq = xq @ w + torch.sin(xq.sum(-1, keepdim=True)) + 0.1 * torch.randn(T, M, 1, generator=g)
    return TaskBatch(xs, ys, xq, yq)
