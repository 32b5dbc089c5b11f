"""RoPE angles of consecutive positions (mmeff.ops.rope.range_angles): the same values as rope_angles, made once."""

from __future__ import annotations

import torch

from mmeff.ops import rope
from mmeff.ops.rope import angles_of, range_angles, rope_angles


def test_range_angles_equal_rope_angles_and_are_kept():
    cos, sin = range_angles(5, 7, 16, torch.device("cpu"))
    want = rope_angles(torch.arange(5, 12), 16)
    torch.testing.assert_close((cos, sin), want, rtol=0, atol=0)
    again = range_angles(5, 7, 16, torch.device("cpu"))
    assert again[0] is cos and again[1] is sin  # kept: no new launches for the next layer
    assert not cos.requires_grad
    assert angles_of(5, 7, 16, torch.device("cpu"))[0] is cos
    other = angles_of(torch.arange(5, 12), 7, 16, torch.device("cpu"))  # a positions tensor: computed from it
    torch.testing.assert_close(other, want, rtol=0, atol=0)


def test_range_angles_of_inference_mode_are_not_saved_for_a_backward():
    with torch.inference_mode():
        inferred = range_angles(0, 4, 8, torch.device("cpu"), base=123.0)
    assert inferred[0].is_inference()
    cos, sin = range_angles(0, 4, 8, torch.device("cpu"), base=123.0)
    assert not cos.is_inference()
    x = torch.randn(1, 4, 2, 8, requires_grad=True)
    rope.apply_rope(x, cos, sin).sum().backward()  # an inference tensor saved for the backward would raise here
    assert x.grad is not None


def test_range_angles_keep_only_the_latest():
    for start in range(3 * rope._KEPT):
        range_angles(start, 3, 4, torch.device("cpu"))
    assert len(rope._ranges) <= rope._KEPT


def test_range_angles_are_made_anew_while_compiling(monkeypatch):
    first = range_angles(1, 3, 4, torch.device("cpu"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = range_angles(1, 3, 4, torch.device("cpu"))
    assert traced[0] is not first[0]
    torch.testing.assert_close(traced, first, rtol=0, atol=0)
