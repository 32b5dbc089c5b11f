"""Linear-attention token mixers: one block shape, six recurrences from `mmeff.ops`.

Every mixer here is `LinearMixer`: q/k/v projection -> optional short conv -> q/k feature map ->
recurrence with a fixed-size state [B, H, K, V] -> per-head norm -> optional swish output gate ->
output projection. The subclasses only add their gates and name their op. Scan routes for
bidirectional inputs come from `ScanMixer` (mmeff/blocks/scan.py).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, ClassVar, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmeff import ops
from mmeff.blocks.cache import Cache
from mmeff.blocks.conv import ShortConv
from mmeff.blocks.layout import Layout
from mmeff.blocks.registry import register
from mmeff.blocks.scan import GroupedNorm, ScanMixer, dt_bias_init, no_decay_parameter, packed
from mmeff.ops.conv import depthwise_conv2d
from mmeff.ops.features import FEATURE_MAPS
from mmeff.ops.recompute import recomputed, recomputed_output, under_autocast_now
from mmeff.ops.rope import apply_rope, range_angles

Recurred = tuple[Tensor, Tensor | None]  # (o [B, T, H, V], final state [B, H, K, V] or None)


class LinearMixer(ScanMixer):
    """Shared linear-attention block; subclasses set `defaults`, add `gates` and call their op in `recur`.

    Options: heads, expand_k / expand_v (key / value width as a multiple of dim), conv_size (short
    conv over q, k, v; 0 = none), feature_map (on q and k: identity, elu (elu+1), relu, silu, l2),
    norm (per-head 'rms', 'group' or 'none'), gate (swish output gate), scale (q scale; None = K**-0.5),
    local_conv (odd kernel size of a depthwise 2-D conv over v on the layout's token grid, added to the
    output: the "DWC" of Han et al., 2023, FLatten Transformer, which gives linear attention back the
    locality and rank it lacks; bidirectional only; 0 = none), remake_gate (the backward makes the output gate
    again from the block's input, which it keeps anyway, instead of keeping the gate: one [tokens, value width] tensor
    less per block for one more matmul), chunk_size, and the scan options of ScanMixer.
    """

    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        dim: int,
        *,
        causal: bool = True,
        heads: int = 4,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        conv_size: int = 0,
        feature_map: str = "identity",
        norm: str = "rms",
        gate: bool = False,
        scale: float | None = None,
        bias: bool = False,
        local_conv: int = 0,
        remake_gate: bool = False,
        **scan_options: Any,
    ) -> None:
        super().__init__(causal=causal, **scan_options)
        if local_conv and (causal or local_conv % 2 == 0 or local_conv < 0):
            raise ValueError(
                f"local_conv must be an odd kernel size of a bidirectional mixer (causal: false), got {local_conv} with causal={causal}"
            )
        self.key_dim, self.value_dim = int(dim * expand_k), int(dim * expand_v)
        if self.key_dim % heads or self.value_dim % heads:
            raise ValueError(f"key width {self.key_dim} and value width {self.value_dim} must divide by heads={heads}")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
        self.heads, self.scale, self.feature_map = heads, scale, feature_map
        self.feature = FEATURE_MAPS[feature_map]
        # Without a short conv the feature map (per token) runs before the scan routes' gathers: a bidirectional
        # scan then maps half the tokens, and what the recurrence keeps for the backward are views of the route
        # copies of what the feature map keeps anyway (ScanMixer's `regathered`). The global form leaves the map to
        # its op (ops.global_linear_attention).
        self.features_first = not conv_size and self.routes.scan != "global"
        # Whether `attend` makes the mapped q and k (a feature map after the scan routes, or positions) and v's copy
        # again in the backward: where they are views of what the backward has anyway (a scan's stream sources, a
        # short conv's output). In one token order without a conv, their recipes would keep the projection they come
        # from, as large as they are together (the RetNet LM's census: 42.79 KiB per token and layer with, 38.79 without).
        maps_qk = not self.features_first or type(self).position is not LinearMixer.position
        self.remakes = maps_qk and (conv_size > 0 or not self.routes.is_identity)
        self.widths = [self.key_dim, self.key_dim, self.value_dim]
        width = sum(self.widths)
        self.qkv = nn.Linear(dim, width, bias=bias)
        self.conv = ShortConv(width, conv_size, bias=False) if conv_size else None
        self.gate = nn.Linear(dim, self.value_dim, bias=bias) if gate else None
        self.remake_gate = remake_gate and gate
        self.norm = GroupedNorm(self.value_dim, heads, norm)
        self.out = nn.Linear(self.value_dim, dim, bias=bias)
        self.local_conv = (
            nn.Conv2d(self.value_dim, self.value_dim, local_conv, padding=local_conv // 2, groups=self.value_dim)
            if local_conv
            else None
        )

    def side_linears(self) -> list[nn.Linear]:
        """The projections of the block's input that `gates` reads, which `project` runs in qkv's matmul."""
        return []

    def gates(self, side: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-token inputs of the recurrence besides q, k, v (decays, betas), [B, T, H(, K)], from the outputs of
        `side_linears`."""
        return []

    def recur(self, q: Tensor, k: Tensor, v: Tensor, gates: list[Tensor], **kw: Any) -> Recurred:
        """The op: q, k [B, T, H, K], v [B, T, H, V] -> (o [B, T, H, V], final state)."""
        raise NotImplementedError

    def position(self, x: torch.Tensor, offset: int, dtype: torch.dtype) -> torch.Tensor:
        """Hook for a position encoding of q or k [B, T, H, K] from token `offset` on (RetNet's rotation), in `dtype`;
        here only the cast."""
        return x.to(dtype)

    def initial_state(self, cache: Cache | None, batch: int) -> torch.Tensor | None:
        """The state the recurrence starts from (`batch` sequences): the cached one, else zeros (None)."""
        return cache.get("state") if cache is not None else None

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(qkv, the outputs of `side_linears`) of x; while autograd records, one matmul over their weights
        concatenated where each is a plain nn.Linear without a bias (a LoRA adapter or a bias keeps them apart)."""
        side = self.side_linears()
        linears = [self.qkv, *side]
        # Only while training: each call concatenates the weights, which decoding (a few tokens, the weights read once
        # by each projection) would pay for with three times the projections' own weight traffic.
        plain = all(type(m) is nn.Linear and m.bias is None for m in linears)
        if not side or not plain or not torch.is_grad_enabled():
            return self.qkv(x), [m(x) for m in side]
        # One weight cast and one matmul forward, one matmul each for the input's and the weights' gradients backward,
        # where separate projections took one of each per projection and added up the input's gradients: the
        # gated_deltanet LM step issues 1,078 launches, 1,198 before (results/launches_side_projections_cpu.md).
        qkv, *outs = F.linear(x, torch.cat([m.weight for m in linears])).split([m.out_features for m in linears], -1)
        return qkv, outs

    def project(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        qkv, side = self.projections(x)
        # Without a short conv, q, k and v travel as three streams: a bidirectional scan's route gathers then
        # write them contiguous, where splitting one gathered qkv stream would leave the kernels three copies.
        if self.conv is not None:
            streams = [qkv]
        else:
            if self.features_first and self.feature is not FEATURE_MAPS["identity"]:
                # q and k through the map (per element or per head) in one call, read in place from the projection.
                qk, v = qkv.split([2 * self.key_dim, self.value_dim], -1)
                qk = self.feature(qk.unflatten(-1, (2 * self.heads, -1))).flatten(-2).to(v.dtype)
                q, k = qk.split(self.key_dim, -1)
                v = v.contiguous()  # a view of the projection would keep it all (raw q and k too) for the backward
            else:
                q, k, v = qkv.split(self.widths, -1)
            streams = [q, k, v]
        return [*streams, *self.gates(side)], x

    def mix(self, streams: list[torch.Tensor], cache: Cache | None, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        batch, length = streams[0].shape[:2]
        streams = [packed(s, cu_seqlens) for s in streams]  # packed documents: one row that cu_seqlens bounds
        kept_as_input: ContextManager[None] = contextlib.nullcontext()
        if self.conv is not None:
            qkv, *gates = streams
            # The recurrence keeps v (and q, k where no feature map makes new ones), views of the conv's output: kept
            # as the conv's input instead, made again in the backward.
            # qkv can be a view of one projection with the side linears' outputs (`projections`): kept as it is, their
            # few columns with it, rather than copied whole.
            out, kept_as_input = self.conv.made_again(qkv, cache, cu_seqlens, keep_view=True)
            parts = out.split(self.widths, -1)
        else:
            parts, gates = streams[:3], streams[3:]
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in parts)
        with kept_as_input:
            o, state = self.attend(
                q,
                k,
                v,
                gates,
                cache.offset if cache is not None else 0,
                mode=self.mode(length),
                chunk_size=self.chunk_size,
                initial_state=self.initial_state(cache, batch if cu_seqlens is None else cu_seqlens.numel() - 1),
                output_final_state=cache is not None,
                scale=self.scale,
                cu_seqlens=cu_seqlens,
            )
        if cache is not None:
            cache["state"] = state
        return o.flatten(-2).view(batch, length, -1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, gates: list[Tensor], offset: int, **kw: Any) -> Recurred:
        """Feature map and positions of q, k [B, T, H, K], then the op (`recur`).

        q and k are views of what the block keeps anyway: of the streams (a bidirectional scan's as the unstacked
        source, `regathered`), or of the short conv's output, which the backward makes again from the conv's input
        (`mix`). Where the feature map or the positions make new tensors of them, which the op keeps for its backward
        (and the l2 map keeps itself), the backward makes them again (RetNet-bi kept two route-stacked copies of its
        rotated q and k otherwise); so too v's contiguous copy, which the kernels take, after a short conv. Not in one
        token order without a conv (`remakes`): there nothing else keeps what they are views of.
        """
        mapped = functools.partial(self.mapped, offset=offset, dtype=v.dtype)
        # Compiled, the partitioner picks what to save; nothing to make again: no hooks on the host's path.
        if torch.compiler.is_compiling() or not self.remakes:
            return self.recur(mapped(q), mapped(k), v, gates, **kw)
        mapped = under_autocast_now(mapped, v.device.type)
        (mq, q_again), (mk, k_again) = recomputed_output(mapped, (q,)), recomputed_output(mapped, (k,))
        recipes = [r for r in (q_again, k_again) if r is not None]
        if self.conv is not None and not v.is_contiguous():  # the kernels take v contiguous: a copy of the slice
            v, sliced = v.contiguous(), v
            recipes.append((v, torch.Tensor.contiguous, (sliced,)))
        with recomputed(recipes):
            return self.recur(mq, mk, v, gates, **kw)

    def mapped(self, x: Tensor, offset: int, dtype: torch.dtype) -> Tensor:
        """q or k through the feature map (unless applied before the scan routes) and the positions, in `dtype`."""
        if not self.features_first:
            x = self.feature(x)
        # CUDA autocast computes some feature maps in fp32 (l2's norm): without the cast the recurrence would run
        # its fp32 kernels (exact fp32 matmuls, no tensor cores) on bf16 values; the LM's gated_deltanet stalled so.
        return self.position(x, offset, dtype)

    def local(self, y: Tensor, streams: list[Tensor], layout: Layout) -> Tensor:
        """y plus the depthwise conv of v over the token grid (local_conv); tokens outside the grid unchanged."""
        if self.local_conv is None:
            return y
        if layout.grid is None:
            raise ValueError("local_conv needs the token grid of an image or spectrogram; this input's layout has none")
        t, h, w = layout.grid
        start, end = layout.special, layout.special + layout.grid_tokens
        v = streams[0][..., -self.value_dim :] if self.conv is not None else streams[2]
        frames = v[:, start:end].reshape(-1, h * w, self.value_dim)  # each of the t frames its own image
        near = depthwise_conv2d(frames, self.local_conv.weight[:, 0], self.local_conv.bias, (h, w))
        near = near.reshape(y.shape[0], end - start, -1).to(y.dtype)
        if start == 0 and end == y.shape[1]:
            return y + near
        return torch.cat([y[:, :start], y[:, start:end] + near, y[:, end:]], dim=1)

    def output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.norm.projected(self.out, y, None)
        # The gate is x's projection, and the backward keeps x for the projections' weight gradients: with
        # remake_gate the norm's backward reads the gate made again from it. Compiled, the gate is made inside the
        # norm's region.
        if self.remake_gate and torch.compiler.is_compiling():
            return self.norm.projected(self.out, y, x, gate=self.gate)
        # Projected here, after the scan, not in `project`: autograd runs the ready backward of the latest-made node
        # first, so the gate projection's backward now runs right after the norm's, and the gate's gradient
        # [tokens, value width] is not held through the recurrence's backward, where the step peaks.
        gate = self.gate(x)
        if not self.remake_gate:
            return self.norm.projected(self.out, y, gate)
        with recomputed([(gate, under_autocast_now(self.gate, x.device.type), (x,))]):
            return self.norm.projected(self.out, y, gate)


@register("linear_attn")
class LinearAttention(LinearMixer):
    """Linear attention (Katharopoulos et al., 2020 'Transformers are RNNs') with a feature map.

    feature_map: elu (elu+1, the paper's), relu or identity; `normalize` divides by
    phi(q)^T sum phi(k) as the paper does (default: on unless feature_map is identity), computed
    on the same recurrence by appending a ones channel to v.
    """

    defaults: ClassVar[dict[str, Any]] = {"feature_map": "elu", "norm": "none"}
    supports_global = True

    def __init__(self, dim: int, *, causal: bool = True, normalize: bool | None = None, eps: float = 1e-6, **options: Any) -> None:
        options = {**self.defaults, **options}
        super().__init__(dim, causal=causal, **options)
        self.normalize = options["feature_map"] != "identity" if normalize is None else normalize
        self.eps = eps

    def attend(self, q: Tensor, k: Tensor, v: Tensor, gates: list[Tensor], offset: int, **kw: Any) -> Recurred:
        if self.routes.scan != "global":
            return super().attend(q, k, v, gates, offset, **kw)
        # The non-causal form (no state to carry: the recurrence options do not apply), on raw q and k: the op applies
        # the feature map (fused into its kernels, or recomputed in its backward).
        o = ops.global_linear_attention(q, k, v, kw["scale"], kw["cu_seqlens"], self.normalize, self.eps, self.feature_map)
        return o, None

    def recur(self, q: Tensor, k: Tensor, v: Tensor, gates: list[Tensor], **kw: Any) -> Recurred:
        if not self.normalize:
            return ops.linear_attention(q, k, v, **kw)
        state = kw.pop("initial_state")
        ones = v.new_ones(*v.shape[:-1], 1)
        o, state = ops.linear_attention(q, k, torch.cat([v, ones], -1), initial_state=state, **kw)
        return o[..., :-1] / (o[..., -1:] + self.eps), state


@register("retnet")
class RetNet(LinearMixer):
    """Multi-scale retention (Sun et al., 2023 'Retentive Network'): fixed per-head decays, group norm, swish gate.

    Head h decays by gamma_h = 1 - 2^(-5-h); q, k are rotated by position (`rope`: the paper's
    e^{in theta}, without xPos' extra scaling); values are 2x wide (expand_v=2) as in the paper, the swish gate as
    wide: the backward makes it again from the block's input (`remake_gate`) rather than keep it.
    """

    defaults: ClassVar[dict[str, Any]] = {"expand_v": 2.0, "norm": "group", "gate": True, "remake_gate": True}

    def __init__(self, dim: int, *, causal: bool = True, rope: bool = True, rope_base: float = 10000.0, **options: Any) -> None:
        super().__init__(dim, causal=causal, **{**self.defaults, **options})
        if rope and (self.key_dim // self.heads) % 2:
            raise ValueError(f"rope needs an even key width per head, got {self.key_dim // self.heads}")
        self.rope, self.rope_base = rope, rope_base
        gamma = 1 - 2.0 ** (-5.0 - torch.arange(self.heads, dtype=torch.float32))
        self.register_buffer("log_decay", gamma.log(), persistent=False)

    def position(self, x: torch.Tensor, offset: int, dtype: torch.dtype) -> torch.Tensor:
        if not self.rope:
            return x.to(dtype)
        cos, sin = range_angles(offset, x.shape[1], x.shape[-1], x.device, self.rope_base)
        return apply_rope(x, cos, sin, dtype)

    def recur(self, q: Tensor, k: Tensor, v: Tensor, gates: list[Tensor], **kw: Any) -> Recurred:
        return ops.retention(q, k, v, self.log_decay, **kw)


@register("gla")
class GLA(LinearMixer):
    """Gated linear attention (Yang et al., 2023 'Gated Linear Attention Transformers'): data-dependent key-wise decay.

    log_g = logsigmoid(W2 W1 x) / gate_normalizer with a rank-`gate_rank` gate projection, swish output
    gate and per-head RMSNorm; key width dim/2 (expand_k=0.5) as in the paper. q and k go in as they are
    (feature_map identity, the paper's) when causal; bidirectional (causal=false), elu+1 by default.

    Why elu+1 for images: where many tokens are alike (the blank background of digit canvases), q.k of
    identity features can cancel, leaving a head's output near zero; the per-head RMSNorm then scales it up,
    and its gradient with it. At initialisation on canvases (4 layers, `benchmarks/init_gradients.py`) the
    gradient reaching the first layer was 61x attention's with identity features and 1.35x with elu+1; on the
    H200 the 12-layer canvas_gla trained 1,200 steps to test mAP 0.42 (chance; fp32 reference path alike) with
    identity features and to 0.78 with elu+1 (timm's ViT-S: 0.77; benchmarks/results/canvas_train_h200.md).
    """

    defaults: ClassVar[dict[str, Any]] = {"expand_k": 0.5, "gate": True}

    def __init__(
        self, dim: int, *, causal: bool = True, gate_rank: int = 16, gate_normalizer: float = 16.0, **options: Any
    ) -> None:
        options = {"feature_map": "identity" if causal else "elu", **self.defaults, **options}
        super().__init__(dim, causal=causal, **options)
        self.gate_normalizer = gate_normalizer
        self.decay = nn.Sequential(nn.Linear(dim, gate_rank, bias=False), nn.Linear(gate_rank, self.key_dim))

    def side_linears(self) -> list[nn.Linear]:
        return [self.decay[0]]

    def gates(self, side: list[torch.Tensor]) -> list[torch.Tensor]:
        # The second projection keeps its input for its weight gradient: a view would keep the whole qkv projection,
        # which the mixer does not keep otherwise where q and k go through a feature map (the ViT's elu).
        log_g = ops.log_sigmoid_gate(self.decay[1](side[0].contiguous()), self.gate_normalizer)
        return [log_g.unflatten(-1, (self.heads, -1))]

    def recur(self, q: Tensor, k: Tensor, v: Tensor, gates: list[Tensor], **kw: Any) -> Recurred:
        return ops.gated_linear_attention(q, k, v, gates[0], **kw)

    def both_routes(self, streams: list[Tensor], layout: Layout) -> Tensor | None:
        """Both routes of `scan: bi` through mmeff.ops.bidirectional_gla where its kernels take the call (q and k
        mapped before the routes, no short conv); else None: the scan routes."""
        if self.conv is not None or not self.features_first:
            return None
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in streams[:3])
        g = streams[3]
        if ops.bidirectional_gla_backend(q, v, g) != "triton":
            return None
        return ops.bidirectional_gla(q, k, v, g, self.scale).flatten(-2)


class _BetaMixer(LinearMixer):
    """Delta-rule mixers: a per-head write strength beta = sigmoid(W_b x) (scaled by `beta_scale`)."""

    beta_scale: float = 1.0

    def __init__(self, dim: int, *, causal: bool = True, **options: Any) -> None:
        super().__init__(dim, causal=causal, **options)
        self.beta = nn.Linear(dim, self.heads, bias=False)

    def side_linears(self) -> list[nn.Linear]:
        return [self.beta]

    def gates(self, side: list[torch.Tensor]) -> list[torch.Tensor]:
        return [ops.scaled_sigmoid(side[-1], self.beta_scale)]


@register("deltanet")
class DeltaNet(_BetaMixer):
    """DeltaNet (Yang et al., 2024 'Parallelizing Linear Transformers with the Delta Rule over Sequence Length').

    Short conv (silu) on q, k, v, L2-normalised q and k, beta = sigmoid(W_b x), per-head RMSNorm.
    """

    defaults: ClassVar[dict[str, Any]] = {"conv_size": 4, "feature_map": "l2"}

    def __init__(self, dim: int, *, causal: bool = True, **options: Any) -> None:
        super().__init__(dim, causal=causal, **{**self.defaults, **options})

    def recur(self, q: Tensor, k: Tensor, v: Tensor, gates: list[Tensor], **kw: Any) -> Recurred:
        return ops.delta_rule(q, k, v, gates[0], **kw)


@register("gated_deltanet")
class GatedDeltaNet(_BetaMixer):
    """Gated DeltaNet (Yang et al., 2024 'Gated Delta Networks'): delta rule with a Mamba-2 style decay alpha.

    log alpha = -exp(A_log) * softplus(W_a x + dt_bias) per head (A ~ U(0, 16), Mamba's dt init),
    beta = sigmoid(W_b x), short conv, L2 q/k, RMSNorm with swish output gate, values 2x wide (the gate as wide,
    so made again in the backward: `remake_gate`).
    """

    defaults: ClassVar[dict[str, Any]] = {"conv_size": 4, "feature_map": "l2", "gate": True, "expand_v": 2.0, "remake_gate": True}

    def __init__(self, dim: int, *, causal: bool = True, **options: Any) -> None:
        super().__init__(dim, causal=causal, **{**self.defaults, **options})
        self.alpha = nn.Linear(dim, self.heads, bias=False)
        self.A_log = no_decay_parameter(torch.empty(self.heads).uniform_(1e-4, 16).log())
        self.dt_bias = no_decay_parameter(dt_bias_init(self.heads))

    def side_linears(self) -> list[nn.Linear]:
        return [self.alpha, *super().side_linears()]

    def gates(self, side: list[torch.Tensor]) -> list[torch.Tensor]:
        log_g = ops.softplus_decay(side[0], self.dt_bias, self.A_log.float(), A_log=True)[1]
        return [log_g, *super().gates(side[1:])]

    def recur(self, q: Tensor, k: Tensor, v: Tensor, gates: list[Tensor], **kw: Any) -> Recurred:
        return ops.gated_delta_rule(q, k, v, gates[0], gates[1], **kw)


@register("ttt")
class TTTLinear(_BetaMixer):
    """TTT-Linear (Sun et al., 2024 'Learning to (Learn at Test Time)'): the state is a linear model trained per token.

    W_t = W_{t-1} - eta_t grad ||W^T k_t - v_t||^2 / 2 = W_{t-1} + eta_t k_t (v_t - W_{t-1}^T k_t)^T is
    exactly the delta rule with beta = eta_t = base_lr * sigmoid(W_lr x); the output is W_t^T q_t
    (scale 1). W_0 is learned per head. k, q are L2-normalised (keeps the inner step stable),
    with the Mamba-backbone short conv and swish output gate of the paper's TTT-Linear (M).
    """

    defaults: ClassVar[dict[str, Any]] = {"conv_size": 4, "feature_map": "l2", "gate": True, "scale": 1.0}

    def __init__(self, dim: int, *, causal: bool = True, base_lr: float = 1.0, **options: Any) -> None:
        super().__init__(dim, causal=causal, **{**self.defaults, **options})
        self.beta_scale = base_lr
        self.W0 = nn.Parameter(torch.randn(self.heads, self.key_dim // self.heads, self.value_dim // self.heads) * 0.02)

    def initial_state(self, cache: Cache | None, batch: int) -> torch.Tensor:
        state = super().initial_state(cache, batch)
        return self.W0.float().expand(batch, *self.W0.shape) if state is None else state

    def recur(self, q: Tensor, k: Tensor, v: Tensor, gates: list[Tensor], **kw: Any) -> Recurred:
        return ops.delta_rule(q, k, v, gates[0], **kw)


