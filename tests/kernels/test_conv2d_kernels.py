"""The depthwise grid-convolution kernels (mmeff.kernels.conv2d, through their custom op mmeff::grid_conv) under the
Triton interpreter against the F.conv2d reference (mmeff.ops.conv.depthwise_conv2d_reference): output and the
gradients of x, weight and bias.

Tolerance: max |kernel - reference| <= 1e-4 * max(1, max |reference|) in float32 (the bias and weight gradients sum
hundreds of terms in another order than F.conv2d's backward: up to 4e-5 seen).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mmeff.ops.conv import depthwise_conv2d, depthwise_conv2d_reference


@pytest.fixture(scope="module")
def grid_conv(kernels):
    from mmeff.ops.custom_ops import grid_conv_op

    return grid_conv_op


def _run(fn, x, weight, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    out = fn(*leaves, *([None] if bias is None else []))
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    return [out, *(t.grad for t in leaves)]


# Grids smaller than the kernel, token tiles cut inside a row and past the end (T not a multiple of the 64-token
# tile), channels not a multiple of the channel block; a strided x (a slice of a wider projection, as v of qkv).
@pytest.mark.parametrize("batch,grid,channels,k", [(2, (7, 11), 70, 3), (1, (2, 3), 5, 5), (3, (9, 8), 33, 1), (1, (1, 1), 4, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_grid_conv_matches_reference(grid_conv, monkeypatch, batch, grid, channels, k, bias, strided):
    monkeypatch.setattr(importlib.import_module("mmeff.kernels.utils"), "POISON", True)
    gen = torch.Generator().manual_seed(grid[0] * channels + k)
    tokens = grid[0] * grid[1]
    wide = torch.randn(batch, tokens, 3 * channels if strided else channels, generator=gen)
    x = wide[..., -channels:]
    weight = torch.randn(channels, k, k, generator=gen) / k
    b = torch.randn(channels, generator=gen) if bias else None
    actual = _run(lambda *a: grid_conv(*a, *grid), x, weight, b)
    expected = _run(lambda *a: depthwise_conv2d_reference(*a, grid), x, weight, b)
    for i, (got, want) in enumerate(zip(actual, expected)):
        assert got.shape == want.shape and got.dtype == want.dtype, i
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item()), i


def test_reference_is_the_conv_of_each_pixel_neighbourhood():
    # By hand at one pixel: bias + the k x k window around it, zero past the edges.
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(1, 12, 2, generator=gen), torch.randn(2, 3, 3, generator=gen), torch.randn(2, generator=gen)
    y = depthwise_conv2d_reference(x, weight, bias, (3, 4)).view(3, 4, 2)
    image = x.view(3, 4, 2)
    for (r, c) in [(0, 0), (1, 2), (2, 3)]:
        want = bias.clone()
        for i in range(3):
            for j in range(3):
                if 0 <= r + i - 1 < 3 and 0 <= c + j - 1 < 4:
                    want += weight[:, i, j] * image[r + i - 1, c + j - 1]
        torch.testing.assert_close(y[r, c], want)


def test_bad_shapes_name_the_tensor():
    with pytest.raises(ValueError, match="x must be"):
        depthwise_conv2d(torch.randn(1, 11, 4), torch.randn(4, 3, 3), None, (3, 4))
    with pytest.raises(ValueError, match="weight must be"):
        depthwise_conv2d(torch.randn(1, 12, 4), torch.randn(4, 2, 2), None, (3, 4))
