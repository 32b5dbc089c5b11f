"""Saved tensors made again in the backward (mmeff.ops.recompute); SSD's use of it: tests/kernels/test_dispatch.py."""

import pytest
import torch

from mmeff.blocks.layout import Layout
from mmeff.blocks.scan import Routes
from mmeff.ops import mlp
from mmeff.ops.recompute import kept_when_compiled, recomputed, recomputed_output, saved_storages, under_autocast_now


def kept(fn):
    """(fn's result, the data pointers of the storages autograd saved tensors of during fn)."""
    with saved_storages() as found:
        out = fn()
    return out, set(found)


def test_a_recomputed_product_is_not_kept_and_gives_the_same_gradients():
    # y = (2a)^2 * b: the square keeps 2a, the product keeps (2a)^2 and b. With 2a as a recipe of a, autograd keeps a
    # instead of 2a, and the gradients are bit for bit those without the hooks.
    a, b = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5, requires_grad=True)
    grads = []
    for use in (False, True):
        def run():
            doubled = a * 2
            with recomputed([(doubled, lambda t: t * 2, (a,))] if use else []):
                return doubled.square() * b  # square keeps `doubled`

        y, ptrs = kept(run)
        y.sum().backward()
        grads.append((a.grad.clone(), b.grad.clone()))
        a.grad = b.grad = None
        assert (a.untyped_storage().data_ptr() in ptrs) is use  # kept as a recipe's input, or not at all
        assert len(ptrs) == 3  # 2a or a, (2a)^2 and b
    assert all(torch.equal(x, y) for x, y in zip(*grads))


def test_a_product_goes_once_each_saved_view_was_read():
    # Two nodes keep views of one product (a short conv's output, which the recipes of gated_deltanet's mapped q, k
    # and v's copy read). Made in the backward when the first reads its view, it is held for the second, then left to
    # the views handed out: once those go, its memory is free while the backward goes on. A second backward through
    # the retained graph makes it again, and the gradients are the same.
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    a = torch.randn(8, 5, requires_grad=True)
    freed, made = [], []

    class Reads(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            ref = StorageWeakRef(x.untyped_storage())
            out = g * x.sign()
            del x
            gc.collect()
            freed.append(ref.expired())
            return out

    def double(t):
        made.append(1)
        return t * 2

    doubled = double(a)
    with recomputed([(doubled, double, (a,))]):
        y = Reads.apply(doubled[:4]) + Reads.apply(doubled[4:])
    del doubled
    y.backward(retain_graph=True)
    first = a.grad.clone()
    y.backward()
    assert freed == [False, True, True, True]  # held for the second reader, then gone after each read
    assert len(made) == 1 + 1 + 2 and torch.equal(a.grad, 2 * first)


def test_a_tuple_of_products_is_made_by_one_call_once():
    # Two products of one call (the route kernels stack all of a mixer's streams in one launch): each kept as the
    # inputs, the call run once in the backward for both, the gradients bit for bit those without the hooks.
    a, b = torch.randn(8, 5, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    grads, calls = [], []

    def both(x, y):
        calls.append(1)
        return x * 2, y * 3

    for use in (False, True):
        def run():
            pa, pb = both(a, b)
            with recomputed([((pa, pb), both, (a, b))] if use else []):
                return pa.square().sum() + pb.square().sum()  # each square keeps its product

        y, ptrs = kept(run)
        y.backward()
        grads.append((a.grad.clone(), b.grad.clone()))
        a.grad = b.grad = None
        inputs = {a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}
        assert len(ptrs) == 2 and (ptrs == inputs) is use  # the inputs kept, or the two products
    assert len(calls) == 3  # two forwards, one backward
    assert all(torch.equal(x, y) for x, y in zip(*grads))


def test_a_product_changed_in_place_is_kept_as_it_is():
    a = torch.randn(4, requires_grad=True)
    doubled = a * 2
    doubled.add_(1)  # no longer what the recipe makes
    with recomputed([(doubled, lambda t: t * 2, (a,))]):
        y = doubled.square()
    y.sum().backward()
    assert torch.allclose(a.grad, 2 * 2 * (2 * a.detach() + 1))


def test_not_while_compiling(monkeypatch):
    # torch.compile's partitioner picks what to save: the hooks stay out of its way.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    a = torch.randn(4, requires_grad=True)
    doubled = a * 2
    _, ptrs = kept(lambda: _square_in(doubled, a))
    assert doubled.untyped_storage().data_ptr() in ptrs


def _square_in(doubled, a):
    with recomputed([(doubled, lambda t: t * 2, (a,))]):
        return doubled.square()


def test_a_make_runs_under_the_autocast_state_of_the_forward():
    # dtype, on/off and the cast cache (off inside a CUDA-graph capture) as where the recipe was made, not the
    # backward's (no autocast).
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        again = under_autocast_now(
            lambda: (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_autocast_cache_enabled()),
            "cpu",
        )
    assert again() == (True, torch.bfloat16, False)


def test_an_output_its_own_call_keeps_is_made_again_once_for_all_its_views():
    # exp keeps its result; the square after it keeps it too. As recomputed_output's product, autograd keeps a (its
    # input) instead, the backward runs exp once for both, and the gradients are bit for bit those of keeping it.
    a = torch.randn(8, 5, requires_grad=True)
    grads, calls = [], []

    def exp(t):
        calls.append(1)
        return t.exp()

    for use in (False, True):
        def run():
            if not use:
                return exp(a).square()
            y, recipe = recomputed_output(exp, (a,))
            with recomputed([recipe]):
                return y.square()

        calls.clear()
        out, ptrs = kept(run)
        out.sum().backward()
        grads.append(a.grad.clone())
        a.grad = None
        assert len(ptrs) == 1 and (a.untyped_storage().data_ptr() in ptrs) is use  # exp's result, or a instead
        assert len(calls) == (2 if use else 1)  # with the recipe: the forward's call and one in the backward
    assert torch.equal(*grads)


def test_no_recipe_for_a_view_of_the_input():
    a = torch.randn(4, requires_grad=True)
    y, recipe = recomputed_output(lambda t: t.view(2, 2), (a,))
    assert recipe is None and y.shape == (2, 2)


def test_the_graph_keeps_no_output_of_a_recomputed_call():
    # Autograd keeps the saved-tensor hooks until the backward: a table of what the call saved kept its output alive
    # there (the l2-normalised q and k of a gated_deltanet-bi ViT: 3 KiB per token and layer, saved_memory.py's live).
    import gc
    import weakref

    a = torch.randn(8, 5, requires_grad=True)
    y, recipe = recomputed_output(torch.exp, (a,))
    with recomputed([recipe]):
        z = y.square()
    alive = weakref.ref(y)
    del y, recipe
    gc.collect()
    assert alive() is None
    z.sum().backward()
    torch.testing.assert_close(a.grad, 2 * (2 * a.detach()).exp(), rtol=1e-6, atol=0)


def compiled_kept(fn, *inputs):
    """Element counts of the tensors torch.compile keeps for the backward of fn(*inputs)."""
    return [t.numel() for t in kept_when_compiled(fn, *inputs)]


def _plain(fn, *args):
    return fn(*args)


@pytest.mark.parametrize("regions", [True, False])
def test_compiled_mlp_keeps_the_activation_input_only(monkeypatch, regions):
    # GELU's output [64, 48] feeds the projection's weight gradient, so the partitioner kept it beside GELU's input;
    # in a compiled_recomputing region only the input is kept (the check fails without the region).
    if not regions:
        monkeypatch.setattr(mlp, "compiled_recomputing", _plain)
    a = torch.randn(64, 48, requires_grad=True)
    weight, bias = torch.randn(16, 48, requires_grad=True), torch.randn(16, requires_grad=True)
    kept = compiled_kept(lambda a, w, b: mlp.act_linear(a * 2, w, b, "gelu"), a, weight, bias)
    assert (kept.count(a.numel()) == 1) is regions, kept
    compiled = [t.grad for t in (a, weight, bias)]
    want = torch.autograd.grad(mlp.act_linear(a * 2, weight, bias, "gelu").square().mean(), (a, weight, bias))
    for got, expected in zip(compiled, want):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("regions", [True, False])
def test_compiled_bidirectional_routes_keep_their_source_not_the_stacked_copy(monkeypatch, regions):
    # A `scan: bi` mixer's streams go along both routes as one stacked copy [2B, T, C], which a matmul (a kernel in a
    # real mixer) reads in the backward: the partitioner kept it; in the region it keeps the source x (half the size)
    # and gathers the copy again in the backward.
    import mmeff.blocks.scan as scan

    if not regions:
        monkeypatch.setattr(scan, "compiled_recomputing", _plain)
    x = torch.randn(2, 16, 8, requires_grad=True)
    weight = torch.randn(8, 8, requires_grad=True)
    routes = Routes(causal=False, scan="bi")
    def run(x, w):
        return routes(lambda streams, _: streams[0].tanh().cumsum(1) @ w, [x * 2], Layout())

    kept = compiled_kept(run, x, weight)
    assert (2 * x.numel() in kept) is not regions, kept
    compiled = [x.grad, weight.grad]
    for got, expected in zip(compiled, torch.autograd.grad(run(x, weight).square().mean(), (x, weight))):
        torch.testing.assert_close(got, expected)



def test_saved_storages_counts_what_the_graph_still_holds():
    # sin keeps its input: the first (2a) is let go with its graph inside the block, the second (3a) is held by y's.
    # Caveat of any identity hook: a node that keeps its own output (exp) holds it in a cycle that outlives the graph.
    a = torch.randn(64, requires_grad=True)
    with saved_storages() as found:
        dropped = (a * 2).sin()
        del dropped
        tripled = a * 3
        y = tripled.sin()
    ptr = tripled.untyped_storage().data_ptr()
    assert list(found) == [ptr] and found[ptr] is tripled
    y.sum().backward()
    torch.testing.assert_close(a.grad, 3 * (3 * a.detach()).cos())
