"""mmeff.ops.causal_conv1d (its F.conv1d path on CPU): the definition, the history of a split sequence, errors."""

import pytest
import torch
import torch.nn.functional as F

from mmeff.ops.conv import causal_conv1d


def test_matches_definition_and_history():
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 9, 5, generator=gen), torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen)
    padded = F.pad(x, (0, 0, 3, 0))  # three zero steps before the sequence
    pre = bias + sum(weight[:, j] * padded[:, j : j + 9] for j in range(4))
    torch.testing.assert_close(causal_conv1d(x, weight, bias), F.silu(pre))
    torch.testing.assert_close(causal_conv1d(x, weight, None, "identity"), pre - bias)
    # The last 6 steps with the 3 before them as history equal the same steps of the whole sequence.
    tail = causal_conv1d(x[:, 3:], weight, bias, prev=x[:, :3].transpose(1, 2))
    torch.testing.assert_close(tail, F.silu(pre)[:, 3:])


def test_bad_inputs_name_the_culprit():
    x, weight = torch.randn(2, 9, 5), torch.randn(5, 4)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, activation="gelu")
    with pytest.raises(ValueError, match=r"weight \[C, W\], got \(2, 9, 5\) and \(6, 4\)"):
        causal_conv1d(x, torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"prev must be \[B, C, W - 1\] = \(2, 5, 3\), got \(2, 5, 2\)"):
        causal_conv1d(x, weight, prev=torch.randn(2, 5, 2))
