"""The batched functional forward against torch.func's vmap(functional_call) and per-task loops."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.testing import assert_close

from hierbayes.models import BatchedNetwork, ParameterLayout
from hierbayes.models.network import unfold_patches
from hierbayes.models.network_plan import (
    ActivationStep,
    BatchNormStep,
    Conv2dStep,
    FlattenStep,
    LinearStep,
    PoolStep,
)


def perturbed(net: BatchedNetwork, T: int) -> torch.Tensor:
    theta = net.initial_parameters()
    return theta + 0.1 * torch.randn(T, theta.numel())


@pytest.mark.parametrize(
    "make, input_shape",
    [
        (
            lambda: nn.Sequential(
                nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
            ),
            (1,),
        ),
        (
            lambda: nn.Sequential(
                nn.Linear(3, 8),
                nn.Tanh(),
                nn.Sequential(nn.Linear(8, 8), nn.ELU()),
                nn.Linear(8, 4, bias=False),
            ),
            (3,),
        ),
        (
            lambda: nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(4, 4, 3),
                nn.Sigmoid(),
                nn.Flatten(),
                nn.Linear(16, 5),
            ),
            (1, 8, 8),
        ),
        (
            lambda: nn.Sequential(
                nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
                nn.GELU(approximate="tanh"),
                nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True),
                nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False, divisor_override=3),
                nn.Flatten(),
                nn.Linear(6, 2),
                nn.Softplus(beta=2.0, threshold=1.0),
            ),
            (2, 7, 6),
        ),
    ],
    ids=["mlp-relu", "mlp-nested", "conv-bn-pool", "conv-pool-options"],
)
def test_fast_path_matches_vmap_and_loop(
    make: Callable[[], nn.Module], input_shape: tuple[int, ...]
) -> None:
    module = make()
    net = BatchedNetwork(module)
    assert net.has_fast_path
    T, N = 3, 6
    phi = perturbed(net, T)
    x = torch.randn(T, N, *input_shape)
    fast = net(phi, x)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    if not has_bn:  # vmap cannot batch a module that updates running statistics in place
        assert_close(fast, net.vmapped(phi, x), atol=1e-12, rtol=1e-10)
    for j in range(T):
        # batch norm in training mode uses the task's own batch statistics, as the fast path does
        module.train()
        ref = functional_call(module, net.layout.unflatten(phi[j]), (x[j],))
        assert_close(fast[j], ref, atol=1e-12, rtol=1e-10)


def test_generic_module_uses_vmap() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.tanh(self.lin(x))

    net = BatchedNetwork(Residual())
    assert not net.has_fast_path
    phi = perturbed(net, 4)
    x = torch.randn(4, 5, 2)
    out = net(phi, x)
    for j in range(4):
        w, b = phi[j, :4].reshape(2, 2), phi[j, 4:]
        assert_close(out[j], x[j] + torch.tanh(x[j] @ w.T + b))
    with pytest.raises(NotImplementedError, match="layer records need"):
        net.forward_with_records(phi, x)


def test_layout_round_trip_and_module_untouched() -> None:
    module = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    before = [p.detach().clone() for p in module.parameters()]
    net = BatchedNetwork(module)
    layout = net.layout
    assert isinstance(layout, ParameterLayout) and layout.num_params == 2 * 3 + 3 + 3 + 1
    flat = torch.randn(5, layout.num_params)
    assert_close(layout.flatten(layout.unflatten(flat)), flat)
    assert layout.slice("2.bias") == slice(12, 13)
    net(flat, torch.randn(5, 4, 2))
    for p, q in zip(module.parameters(), before, strict=True):
        assert torch.equal(p, q)
    assert_close(net.initial_parameters(), torch.cat([p.flatten() for p in before]))


def test_records_hold_layer_inputs_and_preactivations() -> None:
    module = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 2))
    net = BatchedNetwork(module)
    phi = perturbed(net, 2)
    x = torch.randn(2, 3, 1)
    out, records = net.forward_with_records(phi, x)
    assert [r.name for r in records] == ["0", "2"]
    assert_close(records[0].inputs, x)
    assert_close(records[1].inputs, torch.relu(records[0].outputs))
    assert_close(records[1].outputs, out)
    assert records[0].weight == "0.weight" and records[0].bias == "0.bias"


def test_bad_shapes_are_reported() -> None:
    net = BatchedNetwork(nn.Sequential(nn.Linear(1, 2)))
    with pytest.raises(ValueError, match=r"phi must have shape \(tasks, 4\)"):
        net(torch.zeros(3, 5), torch.zeros(3, 2, 1))
    with pytest.raises(ValueError, match="with 3 tasks to match phi"):
        net(torch.zeros(3, 4), torch.zeros(2, 2, 1))


def test_plan_describes_every_layer_as_immutable_data() -> None:
    module = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1, bias=False),
        nn.Sequential(nn.BatchNorm2d(2), nn.LeakyReLU(0.2)),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2, 1),
    )
    net = BatchedNetwork(module)
    assert net.plan == (
        Conv2dStep("0", "0.weight", None, (2, 2), (1, 1), (1, 1)),
        BatchNormStep("1.0", "1.0.weight", "1.0.bias", 1e-5),
        ActivationStep("1.1", "leaky_relu", (("negative_slope", 0.2),)),
        PoolStep("2", "avg", (2, 2), (2, 2), (0, 0)),
        FlattenStep("3"),
        LinearStep("4", "4.weight", "4.bias"),
    )
    assert [step.kind for step in net.plan] == [
        "conv2d",
        "batchnorm",
        "activation",
        "pool",
        "flatten",
        "linear",
    ]
    assert all(name in net.layout.names for step in net.plan for name in _names(step))
    with pytest.raises(dataclasses.FrozenInstanceError):
        net.plan[0].weight = "1.0.bias"  # type: ignore[misc]
    assert net.has_batch_norm
    assert not BatchedNetwork(nn.Sequential(nn.Linear(1, 1))).has_batch_norm


def _names(step: object) -> list[str]:
    return [n for n in (getattr(step, "weight", None), getattr(step, "bias", None)) if n]


@pytest.mark.parametrize(
    "module",
    [
        nn.Conv2d(1, 1, 3, groups=1, padding="same"),
        nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)),
        nn.Sequential(nn.Linear(2, 2), nn.Flatten(start_dim=2)),
        nn.Sequential(nn.Linear(1, 1), nn.Softmax(dim=-1)),
    ],
    ids=["padding-string", "grouped", "partial-flatten", "unsupported-layer"],
)
def test_layers_without_a_step_form_leave_the_plan_empty(module: nn.Module) -> None:
    net = BatchedNetwork(module)
    assert net.plan is None and not net.has_fast_path


def test_shared_layer_runs_through_vmap() -> None:
    shared = nn.Linear(2, 2)
    net = BatchedNetwork(nn.Sequential(shared, nn.Tanh(), shared))
    # the second use has no parameters of its own in the layout
    assert net.plan is None
    phi = perturbed(net, 2)
    x = torch.randn(2, 3, 2)
    w, b = phi[:, :4].reshape(2, 2, 2), phi[:, 4:]
    h = torch.tanh(x @ w.transpose(1, 2) + b[:, None])
    assert_close(net(phi, x), h @ w.transpose(1, 2) + b[:, None])


def test_unfold_patches_reproduces_the_convolution() -> None:
    """``weight.reshape(out, -1) @ patches`` is the convolution (im2col)."""
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    x = torch.randn(2, 5, 3, 7, 6)  # (T, N, C, H, W)
    patches = unfold_patches(x, conv)
    expected = conv(x.reshape(10, 3, 7, 6))
    assert patches.shape == (2, 5, 3 * 3 * 2, expected.shape[-2] * expected.shape[-1])
    out = conv.weight.reshape(4, -1) @ patches + conv.bias[:, None]
    assert_close(out.reshape(10, *expected.shape[1:]), expected)
    with pytest.raises(ValueError, match="numeric padding"):
        unfold_patches(x, nn.Conv2d(3, 4, 3, padding="same"))
