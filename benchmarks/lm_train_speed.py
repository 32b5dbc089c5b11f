"""Training throughput of 12-layer, width-1024 byte-level LMs: every efficient mmeff mixer, hybrids and MoE against mmeff
attn and against the implementation a user would pick (Hugging Face Llama, fla, mamba_ssm), in one process.

One step = forward, next-token cross-entropy, backward, fused AdamW on B x T tokens (bf16 autocast, fp32 weights; on
the CPU, `--device cpu`, fp32 without autocast). B = max(1, `--tokens` // T): about 16k tokens per step. Median of
`--iters` steps after `--warmup`. Width 1024, 12 layers, SwiGLU 2736, byte vocabulary (260 ids), tied embeddings.

Rows (`--rows`; default all but the variants mamba2_mmeff, mamba2_mamba_ssm and gated_deltanet_v1):
- mmeff (`mmeff.tasks.build_model` of a RunConfig, what `mmeff fit` trains): `attn` (16 heads of 64, RoPE), `gla`
  (4 heads, K 128, V 256), `mamba2` (head 64, state 128; mmeff.ops.ssd's auto backend: mmeff's SSD kernels, mamba-ssm's
  where they cannot run), `mamba2_mmeff` / `mamba2_mamba_ssm` (the same on mmeff's / mamba-ssm's SSD kernels, named),
  `gated_deltanet` (8 heads, K 128, V 256), `gated_deltanet_v1` (the same with values as wide as keys, expand_v 1: about
  attn's parameters, 164 M against 152 M),
  `deltanet` (8 heads, K = V = 128), `retnet` (8 heads, K 128, V 256), `hybrid_gla` ([gla, gla, gla, attn]),
  `hybrid_mamba2` ([mamba2, mamba2, mamba2, attn]), `attn_moe` / `gla_moe` (8 SwiGLU experts of 1368, top-2: the
  active parameters of the dense twin; Switch aux loss added to the loss as `mmeff fit` does). An mmeff row ending in
  `+ckpt_norm`, `+ckpt_mixer`, `+ckpt` or `+no_ckpt` sets `backbone.checkpoint` to norm (the default, which a row
  without a suffix takes), mixer, true or false (`mamba2+ckpt_mixer`).
- peers, same dims: `hf_llama` (transformers LlamaForCausalLM, attn_implementation="sdpa") for attn; `fla_gla`,
  `fla_deltanet`, `fla_gated_deltanet` (fla's GLA / DeltaNet / GatedDeltaNetForCausalLM, their default fused norms,
  SwiGLU and short convs) for gla, deltanet, gated_deltanet; `mamba_ssm` (MambaLMHeadModel, Mamba2 + GatedMLP 2736,
  without causal-conv1d's extension: use_mem_eff_path False) for mamba2. A peer whose package is missing is noted
  'skipped'; one that refuses to run (fla 0.6 refuses chunk_gated_delta_rule's backward on Hopper with Triton < 3.7.1)
  is noted 'refused: <its reason>'. Peers run unpacked only (`--docs 0`).

Per record (JSON): row, T, B, docs, compiled (and compile_mode, where not torch.compile's default), graphs, tok_s, ms
(median step), peak_gib, vs_attn (tok/s over mmeff attn's at the same T, docs and mode), vs_peer (an mmeff row's tok/s
over its peer's), vs_dense (a MoE row over its dense twin), params_m, active_params_m, floor_ms and its parts, mfu, note. The floor of one step is
    floor = matmul_flops / R + mixer floor + 28 bytes x params / W
- R: the bf16 matmul rate measured in the same run (8192^3 bf16 matmul; fp32 on the CPU); W: the copy bandwidth
  measured in the same run (bytes read + written by a 1 GiB device copy).
- matmul_flops = 6 x B x T x (sum of in x out over every nn.Linear + top_k x an expert's weights per MoE block):
  forward, input gradient and weight gradient of each projection, FFN, expert and the head.
- mixer floor, per layer, fwd + bwd over the B x T tokens, max(flops / R, bytes / W) with
  - softmax attention (causal, FlashAttention's recompute): flops 7 x T x heads x head_dim per token, bytes as below;
  - chunked recurrences (chunk C, H heads, key K, value V per head; kernels compute full C x C blocks): flops per
    token 3 x H x (2C(K + V) + 4KV); the delta rules add the WY pieces, 3 x H x (2C(2K + V) + 2KV);
    Mamba-2's SSD (groups G, state N, head P): 3 x (G 2CN + H (2CP + 4NP));
  - bytes per token: 3 x inputs + 2 x outputs in bf16 (forward reads q, k, v, gates and writes o; backward reads
    them and do, writes their gradients); gates in fp32 (GLA's per-key decay, per-head betas and decays, Mamba-2's
    dt); plus a short conv's 10 bytes per channel (read x, write y; read x and dy, write dx);
  chunk states are not counted (a fused kernel need not write them).
- optimizer: fused AdamW reads parameter, gradient and two moments and writes three (7 x 4 bytes per parameter).
Peers take the floor of their mmeff row's mixers and their own projections. mfu = (matmul_flops + mixer flops) / (ms
x R): model FLOPs utilisation against the measured matmul rate (the datasheet's dense bf16 peak is about 1.25x it).

`--profile` adds, per record, where one step's GPU time goes: matmuls, softmax attention, recurrence kernels
(mmeff's, mamba_ssm's, fla's), short convolutions, the optimizer, the rest (norms, activations, casts, copies); the
step's longest kernels by name (`top_kernels`: name, ms, calls; also printed); and `host_ms`, the host's time to
queue one step from an idle device (median of 3). A step whose host_ms is near its ms, with GPU time to spare, waits
on the host: its kernels are queued slower than the GPU runs them.
`--docs 0 8` runs each mmeff row unpacked and with 8 packed documents per sequence (the layout's cu_seqlens reach
every mixer). `--compile [MODE]` runs every model through torch.compile (nn.Module.compile, in `MODE`, as
`trainer.compile`); `--graphs` replays each mmeff row's forward and backward as CUDA graphs
(mmeff.tasks.graphs.GraphedTraining, what `trainer.cuda_graphs` runs for the classify task; unpacked rows only, no peers, no MoE: a replay would drop the balancing loss). Peak memory is not
recorded under graphs (their pools are outside the allocator's count). Records merge into
`--out`.{md,json,png} (default benchmarks/results/lm_train_speed_<device>) by (row, T, docs, mode), rewritten
after every record, so a run cut short keeps its rows and several runs build one table.

`--warm` first steps every row at a small T in parallel child processes, so that a fresh machine compiles the rows'
kernels on all its cores at once instead of one after another in the timed run (see `warm`).

    MMEFF_TRITON_PIN=1 TRITON_CACHE_AUTOTUNING=1 python benchmarks/lm_train_speed.py --T 4096 16384 --warm
    python benchmarks/lm_train_speed.py --T 16384 --rows attn gla mamba2 --docs 0 8 --profile
    python benchmarks/lm_train_speed.py --device cpu --out /tmp/lm_smoke   # tiny sizes: every row builds and steps
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import itertools
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmeff import blocks, config
from mmeff.encoders.text import ByteTokenizer
from mmeff.ops.varlen import doc_bounds
from mmeff.tasks import build_model
from mmeff.tasks.graphs import GraphedTraining
from mmeff.trainer import compile_options
from timing import (  # beside this file
    CHECKPOINT, COMPILE_MODES, add_compile_argument, compile_fields, compile_label, copy_bandwidth, device_tag,
    error_note, free, matmul_rate, median_ms, replays_graphs, run_id, run_in_parallel, save_figure, unchecked, write_results,
)


@dataclass(frozen=True)
class Shape:
    """Model sizes: the benchmark's, or `--device cpu`'s tiny smoke sizes."""

    dim: int = 1024
    depth: int = 12
    ffn_hidden: int = 2736  # SwiGLU width: 8/3 x 1024, rounded up to 8
    attn_head: int = 64  # softmax attention's head width
    key_head: int = 128  # the linear mixers' key width per head (K)
    ssm_head: int = 64  # Mamba-2's head width (P)
    d_state: int = 128  # Mamba-2's state size (N)
    tokens: int = 16384  # per step: B = tokens // T
    lengths: tuple[int, ...] = (2048, 4096, 16384, 65536)


REAL = Shape()
SMOKE = Shape(dim=64, depth=2, ffn_hidden=176, attn_head=16, key_head=16, ssm_head=16, d_state=16, tokens=128, lengths=(64,))
EXPERTS, TOP_K = 8, 2

# mmeff rows: the backbone pattern; MoE rows and variants named below.
PATTERNS = {
    "attn": ["attn"],
    "gla": ["gla"],
    "mamba2": ["mamba2"],
    "mamba2_mmeff": ["mamba2"],
    "mamba2_mamba_ssm": ["mamba2"],
    "gated_deltanet": ["gated_deltanet"],
    "gated_deltanet_v1": ["gated_deltanet"],
    "deltanet": ["deltanet"],
    "retnet": ["retnet"],
    "hybrid_gla": ["gla", "gla", "gla", "attn"],
    "hybrid_mamba2": ["mamba2", "mamba2", "mamba2", "attn"],
    "attn_moe": ["attn"],
    "gla_moe": ["gla"],
}
# per-mixer options a row adds
VARIANTS = {"mamba2_mmeff": {"mamba2": {"backend": "triton"}}, "mamba2_mamba_ssm": {"mamba2": {"backend": "mamba_ssm"}},
            "gated_deltanet_v1": {"gated_deltanet": {"expand_v": 1.0}}}
DENSE_TWIN = {"attn_moe": "attn", "gla_moe": "gla"}
MODES = ["eager", "compiled", *(f"compiled-{m}" for m in COMPILE_MODES[1:]), "graphs"]  # the tables' order
PEERS = {"hf_llama": "attn", "fla_gla": "gla", "mamba_ssm": "mamba2", "fla_gated_deltanet": "gated_deltanet",
         "fla_deltanet": "deltanet"}  # fmt: skip
PACKAGES = {"hf_llama": "transformers", "fla_gla": "fla", "fla_deltanet": "fla", "fla_gated_deltanet": "fla",
            "mamba_ssm": "mamba_ssm"}  # fmt: skip
ORDER = ["attn", "hf_llama", "gla", "fla_gla", "mamba2", "mamba_ssm", "mamba2_mmeff", "mamba2_mamba_ssm", "gated_deltanet",
         "fla_gated_deltanet", "gated_deltanet_v1", "deltanet", "fla_deltanet", "retnet", "hybrid_gla", "hybrid_mamba2", "attn_moe", "gla_moe"]  # fmt: skip
DEFAULT_ROWS = [r for r in ORDER if r not in VARIANTS]


def mixer_options(shape: Shape) -> dict[str, dict[str, Any]]:
    """Options of each mmeff mixer at `shape` (the peers are built with the same head sizes)."""
    k = shape.key_head
    return {
        "attn": {"heads": shape.dim // shape.attn_head},
        "gla": {"heads": shape.dim // (2 * k)},  # expand_k 0.5: K = k per head, V = 2k
        "retnet": {"heads": shape.dim // k},  # K = k, V = 2k (expand_v 2)
        "deltanet": {"heads": shape.dim // k},  # K = V = k
        "gated_deltanet": {"heads": shape.dim // k},  # K = k, V = 2k (expand_v 2)
        "mamba2": {"head_dim": shape.ssm_head, "d_state": shape.d_state},
    }


def pattern_of(row: str) -> list[str] | None:
    """The backbone pattern of mmeff row `row` (a checkpoint suffix, `attn+ckpt_norm`, sets backbone.checkpoint), None
    for a peer's."""
    return PATTERNS.get(unchecked(row)[0])


def run_config(row: str, shape: Shape, T: int) -> config.RunConfig:
    """The RunConfig of mmeff row `row` at sequence length T."""
    row, checkpoint = unchecked(row)
    pattern = PATTERNS[row]
    options = mixer_options(shape)
    mixers = {m: {**options[m], **VARIANTS.get(row, {}).get(m, {})} for m in dict.fromkeys(pattern)}
    moe = row in DENSE_TWIN
    experts = {"num_experts": EXPERTS, "top_k": TOP_K, "hidden": shape.ffn_hidden // TOP_K}  # active width = the dense one
    ffn_options = experts if moe else {"hidden": shape.ffn_hidden}
    return config.parse(
        {"name": f"lm_speed_{row}", "encoder": {"name": "text", "tokenizer": "byte", "seq_len": T},
         "backbone": {"dim": shape.dim, "depth": shape.depth, "pattern": pattern, "causal": True,
                      "ffn": "moe" if moe else "swiglu", "ffn_options": ffn_options, "mixers": mixers,
                      "checkpoint": checkpoint},
         "task": {"name": "lm"}}
    )  # fmt: skip


Logits = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def build(row: str, shape: Shape, T: int, bounds: tuple[int, ...] | None = None) -> tuple[nn.Module, Logits]:
    """(model, fn(tokens [B, T], docs) -> logits [B, T, V]) of `row`; `bounds`: the documents' boundaries as host
    integers, as `mmeff fit` finds them on the CPU before a batch moves (mmeff.tasks.lm.host_facts)."""
    if pattern_of(row):
        model = build_model(run_config(row, shape, T))
        return model, lambda x, docs: model(x, docs=docs, bounds=bounds)
    model = PEER_BUILDERS[row](shape, T)
    if row == "mamba_ssm":
        return model, lambda x, docs: model(x).logits
    return model, lambda x, docs: model(input_ids=x, use_cache=False).logits


def _vocab() -> int:
    return ByteTokenizer().vocab_size


def hf_llama(shape: Shape, T: int) -> nn.Module:
    """transformers' LlamaForCausalLM with mmeff attn's dims (SDPA attention, RoPE, RMSNorm, SwiGLU, tied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = mixer_options(shape)["attn"]["heads"]
    cfg = LlamaConfig(vocab_size=_vocab(), hidden_size=shape.dim, intermediate_size=shape.ffn_hidden,
                      num_hidden_layers=shape.depth, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=T, rms_norm_eps=1e-6, tie_word_embeddings=True, use_cache=False,
                      attn_implementation="sdpa")  # fmt: skip
    return LlamaForCausalLM(cfg)


def fla_model(kind: str) -> Callable[[Shape, int], nn.Module]:
    """A builder of fla's <kind>ForCausalLM with the dims of the mmeff mixer of the same name."""

    def make(shape: Shape, T: int) -> nn.Module:
        import fla.models as fm

        heads = mixer_options(shape)[kind]["heads"]
        common = dict(hidden_size=shape.dim, num_hidden_layers=shape.depth, intermediate_size=shape.ffn_hidden,
                      vocab_size=_vocab(), tie_word_embeddings=True, use_cache=False, norm_eps=1e-6,
                      max_position_embeddings=T, num_heads=heads)  # fmt: skip
        if kind == "gla":
            return fm.GLAForCausalLM(fm.GLAConfig(expand_k=0.5, expand_v=1.0, **common))
        if kind == "deltanet":
            return fm.DeltaNetForCausalLM(fm.DeltaNetConfig(expand_k=1.0, expand_v=1.0, **common))
        return fm.GatedDeltaNetForCausalLM(fm.GatedDeltaNetConfig(head_dim=shape.key_head, expand_v=2.0, **common))

    return make


def import_mamba_ssm() -> types.ModuleType:
    """mamba_ssm without its CUDA extension: its __init__ imports selective_scan_cuda, which the Triton kernels do not
    use, so a placeholder module lets the import through (mmeff.ops.ssm tells a placeholder from the real one)."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    import mamba_ssm.models.mixer_seq_simple as mamba

    return mamba


def mamba_ssm_model(shape: Shape, T: int) -> nn.Module:
    """mamba_ssm's MambaLMHeadModel: 12 Mamba2 layers, each followed by a GatedMLP (SwiGLU) of mmeff's width."""
    mamba = import_mamba_ssm()
    from mamba_ssm.models.config_mamba import MambaConfig

    ssm = {"layer": "Mamba2", "use_mem_eff_path": False, "d_state": shape.d_state, "headdim": shape.ssm_head}
    cfg = MambaConfig(d_model=shape.dim, d_intermediate=shape.ffn_hidden, n_layer=shape.depth, vocab_size=_vocab(),
                      ssm_cfg=ssm, tie_embeddings=True)  # fmt: skip
    return mamba.MambaLMHeadModel(cfg)


PEER_BUILDERS: dict[str, Callable[[Shape, int], nn.Module]] = {
    "hf_llama": hf_llama,
    "fla_gla": fla_model("gla"),
    "fla_deltanet": fla_model("deltanet"),
    "fla_gated_deltanet": fla_model("gated_deltanet"),
    "mamba_ssm": mamba_ssm_model,
}


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; off on the CPU, whose bf16 matmuls are emulated and slow."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step(
    model: nn.Module,
    logits_of: Logits,
    tokens: torch.Tensor,
    docs: torch.Tensor | None,
    opt: torch.optim.Optimizer | None = None,
    precision: Callable[[], AbstractContextManager] | None = None,
    ignore_index: int = -100,
) -> Callable[[], None]:
    """One training step on `tokens` [B, T + 1]: forward (under `precision`, default bf16 autocast on CUDA), next-token
    loss (+ MoE aux losses), backward, `opt` (default fused AdamW)."""
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    precision = precision or (lambda: autocast(tokens.device))
    balanced = [m for m in model.modules() if hasattr(m, "aux_loss")]  # MoE blocks leave their balancing loss here

    def step() -> None:
        with precision():
            logits = logits_of(tokens[:, :-1], docs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=ignore_index)
        for m in balanced:
            if m.aux_loss is not None:
                loss = loss + m.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# ----- floors


@dataclass
class Cost:
    """What one training step of B x T tokens must do at least: matmul FLOPs, the mixers' FLOPs and bytes."""

    matmul_flops: float = 0.0
    mixer_flops: float = 0.0
    mixer_ms: float = 0.0  # each layer's max(flops / R, bytes / W), summed


def projection_flops_per_token(model: nn.Module) -> tuple[float, float]:
    """(6 x the weights every token passes through, active parameters): nn.Linear layers and top-k MoE experts."""
    flops, inactive = 0.0, 0.0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            flops += 6 * m.in_features * m.out_features
        elif hasattr(m, "top_k") and hasattr(m, "w_in") and hasattr(m, "w_out"):  # mmeff.blocks.moe.MoE
            per_expert = m.w_in[0].numel() + m.w_out[0].numel()
            flops += 6 * m.top_k * per_expert
            inactive += (m.num_experts - m.top_k) * per_expert
    params = sum(p.numel() for p in model.parameters())
    return flops, params - inactive


def mixer_cost(name: str, mixer: nn.Module, T: int) -> tuple[float, float]:
    """(FLOPs, bytes) per token of one mixer layer's kernels, forward + backward (formulas in the module docstring)."""
    bf16, fp32 = 2, 4
    conv = getattr(mixer, "conv", None)  # mmeff.blocks.conv.ShortConv, holding an nn.Conv1d
    conv_bytes = 10 * conv.conv.out_channels if conv is not None else 0
    if name == "attn":
        H, d = mixer.heads, mixer.head_dim
        inputs, outputs = bf16 * 3 * H * d, bf16 * H * d
        return 7 * T * H * d, 3 * inputs + 2 * outputs
    if name == "mamba2":
        H, P, N, G, C = mixer.heads, mixer.head_dim, mixer.d_state, mixer.ngroups, 64
        flops = 3 * (G * 2 * C * N + H * (2 * C * P + 4 * N * P))
        inputs, outputs = bf16 * (H * P + 2 * G * N) + fp32 * H, bf16 * H * P
        return flops, 3 * inputs + 2 * outputs + conv_bytes
    H, C = mixer.heads, mixer.chunk_size
    K, V = mixer.key_dim // H, mixer.value_dim // H
    flops = 3 * H * (2 * C * (K + V) + 4 * K * V)
    if name in ("deltanet", "gated_deltanet"):
        flops += 3 * H * (2 * C * (2 * K + V) + 2 * K * V)
    gates = {"gla": H * K, "deltanet": H, "gated_deltanet": 2 * H}.get(name, 0) * fp32
    inputs, outputs = bf16 * H * (2 * K + V) + gates, bf16 * H * V
    return flops, 3 * inputs + 2 * outputs + conv_bytes


@functools.cache
def mixers_of(row: str, shape: Shape) -> list[tuple[str, nn.Module]]:
    """(name, module) of each layer's mixer of mmeff row `row`: one of each kind built on the CPU, cycled to the depth."""
    options = run_config(row, shape, 1).backbone.mixers
    built = {m: blocks.build(m, shape.dim, causal=True, **options[m]) for m in options}
    pattern = pattern_of(row)
    return [(pattern[i % len(pattern)], built[pattern[i % len(pattern)]]) for i in range(shape.depth)]


def step_cost(model: nn.Module, layers: list[tuple[str, nn.Module]], B: int, T: int, rate: float, bandwidth: float) -> Cost:
    """The floor's pieces for one step of `model` whose mixers are `layers`."""
    per_token, _ = projection_flops_per_token(model)
    cost = Cost(matmul_flops=per_token * B * T)
    for name, mixer in layers:
        flops, nbytes = mixer_cost(name, mixer, T)
        cost.mixer_flops += flops * B * T
        cost.mixer_ms += max(flops * B * T / rate, nbytes * B * T / bandwidth) * 1e3
    return cost


def floors(cost: Cost, params: int, ms: float, rate: float, bandwidth: float) -> dict[str, float]:
    """floor_ms, its parts, ms over the floor and the MFU of a step of `ms`."""
    parts = {"floor_matmul_ms": cost.matmul_flops / rate * 1e3, "floor_mixer_ms": cost.mixer_ms,
             "floor_optimizer_ms": 28 * params / bandwidth * 1e3}  # fmt: skip
    total = sum(parts.values())
    flops = cost.matmul_flops + cost.mixer_flops
    return {**parts, "floor_ms": total, "over_floor": ms / total, "model_tflop": flops / 1e12, "mfu": flops / (ms / 1e3) / rate}


# ----- profile


def mmeff_kernels() -> set[str]:
    """Names of mmeff's recurrence kernels (as the profiler lists them); the conv and MoE kernels are not."""
    import triton

    import mmeff.kernels  # noqa: F401  (imports every kernel module)

    names = set()
    for name, module in sys.modules.items():
        if name.startswith("mmeff.kernels") and name not in ("mmeff.kernels.conv", "mmeff.kernels.moe"):
            for obj in vars(module).values():
                while hasattr(obj, "fn") and not isinstance(obj, triton.runtime.JITFunction):
                    obj = obj.fn  # autotuners and heuristics wrap the JITFunction
                if isinstance(obj, triton.runtime.JITFunction):
                    names.add(obj.__name__)
    return names


KINDS = ["matmul", "softmax attention", "recurrence kernels", "conv", "optimizer", "other"]
CATEGORIES = [  # first match wins; the rest is "other"
    # cuDNN's SDPA runs helper kernels named cudnn::fusion::... beside its flash kernels.
    ("softmax attention", re.compile(r"flash|fmha|attention|sdpa|cudnn::fusion", re.I)),
    # The mixers' short depthwise convolutions: mmeff's kernels, fla's, or F.conv1d's native, cuDNN or implicit-GEMM ones.
    ("conv", re.compile(r"_conv_(fwd|bwd)_kernel|conv(?!ert)|cudnn|fprop|dgrad|wgrad", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma|sm90_|sm80_", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|foreach", re.I)),
    # mamba_ssm's SSD kernels; fla's chunked kernels (chunk_*, WY representation, triangular solves, cumsums).
    ("recurrence kernels", re.compile(r"^_(chunk_scan|chunk_state|state_passing|bmm_chunk|chunk_cumsum)|^chunk_|"
                                      r"wy_|recompute_w_u|solve_tril|merge_16x16|chunk_local_cumsum")),
]  # fmt: skip


# Kernels of a profiled step kept in its record (`top_kernels`), the longest first.
TOP_KERNELS = 12


def kernel_times(events: Iterable[Any], ours: set[str]) -> tuple[dict[str, float], list[list]]:
    """GPU milliseconds per kernel category, and the TOP_KERNELS longest kernels as [name, ms, calls], of
    torch.profiler's averaged events (CUDA kernels only)."""
    ms: dict[str, float] = defaultdict(float)
    kernels = []
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CUDA or event.self_device_time_total <= 0:
            continue
        name, event_ms = event.key, event.self_device_time_total / 1e3
        kind = "recurrence kernels" if name in ours else next((k for k, rx in CATEGORIES if rx.search(name)), "other")
        ms[kind] += event_ms
        kernels.append([name, event_ms, event.count])
    return dict(ms), sorted(kernels, key=lambda kernel: -kernel[1])[:TOP_KERNELS]


def breakdown(step: Callable[[], None], ours: set[str]) -> tuple[dict[str, float], list[list]]:
    """kernel_times of one step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return kernel_times(prof.key_averages(), ours)


def host_ms(step: Callable[[], None], device: torch.device, reps: int = 3) -> float:
    """Median milliseconds the host takes to queue `step` (its return, not the device's end), the device idle before."""
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    synchronize(device)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- one record


def measure(row: str, T: int, ndocs: int, shape: Shape, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One record: build, (compile,) time, floor; a refusal, an error or OOM becomes the record's note."""
    B = max(1, shape.tokens // T)
    record: dict[str, Any] = {"row": row, "T": T, "B": B, "docs": ndocs, **compile_fields(args.compile), "graphs": args.graphs}
    if args.graphs and (row in PEERS or ndocs):
        return {**record, "note": "skipped: --graphs replays mmeff rows without packed documents"}
    if row in PEERS:
        record["peer_of"] = PEERS[row]
        if importlib.util.find_spec(PACKAGES[row]) is None:
            return {**record, "note": f"skipped: {PACKAGES[row]} is not installed"}
    model = step = None
    torch.manual_seed(0)
    try:
        docs = (torch.arange(T) * ndocs // T).expand(B, T) if ndocs else None
        bounds = None if docs is None or args.compile else doc_bounds(docs)  # compiled: traced from docs instead
        with device:  # parameters made where they train: a CPU init of 150M parameters takes seconds a row
            model, logits_of = build(row, shape, T, bounds)
        _, active = projection_flops_per_token(model)
        params = sum(p.numel() for p in model.parameters())
        record.update(params_m=params / 1e6, active_params_m=active / 1e6)
        if args.compile:
            torch._dynamo.reset()  # a fresh cache per model: rows would otherwise hit dynamo's recompile limit
            model.compile(**compile_options(args.compile))
        if args.graphs:
            graphed = GraphedTraining(model)
            logits_of = lambda x, docs: graphed(x)  # noqa: E731
        tokens = torch.randint(0, 256, (B, T + 1), device=device)
        step = train_step(model, logits_of, tokens, None if docs is None else docs.to(device))
        ms, peak = median_ms(step, device, args.warmup, args.iters)
        record.update(ms=ms, tok_s=B * T / ms * 1e3, peak_gib=None if replays_graphs(args.graphs, args.compile) else peak)
        if args.profile:
            record["host_ms"] = host_ms(step, device)
        if args.profile and device.type == "cuda":
            record["profile_ms"], record["top_kernels"] = breakdown(step, args.ours)
            for name, kernel_ms, calls in record["top_kernels"]:
                print(f"  {kernel_ms:8.2f} ms {calls:5d} calls  {name[:100]}", flush=True)
        cost = step_cost(model, mixers_of(PEERS.get(row, row), shape), B, T, args.rate, args.bandwidth)
        record.update(floors(cost, params, ms, args.rate, args.bandwidth))
    except torch.cuda.OutOfMemoryError:
        record["note"] = "OOM"
    except Exception as e:  # noqa: BLE001  (a row that fails is recorded, the run goes on)
        record["note"] = f"refused: {error_note(e)}" if row in PEERS else error_note(e)
    finally:
        del model, step
        free(device)
    return record


def mode(record: dict[str, Any]) -> str:
    """'eager', 'compiled', 'compiled-<mode>' or 'graphs' (records written before --graphs existed ran without)."""
    return "graphs" if record.get("graphs") else compile_label(record) or "eager"


def relate(records: list[dict[str, Any]]) -> None:
    """Fill vs_attn, vs_peer and vs_dense from the records of the same run, T, docs and compile setting (a ratio
    across processes would mix in the host's and the GPU's drift between runs)."""
    speed = {(r["row"], r["run"], r["T"], r["docs"], mode(r)): r["tok_s"] for r in records if r.get("tok_s")}
    peer_of = {mmeff: peer for peer, mmeff in PEERS.items()}
    for r in records:
        if not r.get("tok_s"):
            continue
        key = (r["run"], r["T"], r["docs"], mode(r))
        for field, ref in (("vs_attn", "attn"), ("vs_peer", peer_of.get(r["row"])), ("vs_dense", DENSE_TWIN.get(r["row"]))):
            if ref and (ref, *key) in speed:
                r[field] = r["tok_s"] / speed[(ref, *key)]


# ----- output


def load(path: Path) -> list[dict[str, Any]]:
    """Records of earlier runs in `path` (none if it does not exist)."""
    return json.loads(path.read_text())["records"] if path.is_file() else []


def write(records: list[dict[str, Any]], out: Path) -> None:
    """<out>.json, .md and .png of `records` (each file replaced whole)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    order = {r: i for i, r in enumerate(ORDER)}
    records.sort(key=lambda r: (r["T"], r["docs"], MODES.index(mode(r)), r["run"], order.get(r["row"], 99)))
    write_results(out, {"records": records}, table(records))
    plot(records, out.with_suffix(".png"))


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: one table per T under the runs' devices, ceilings and commands."""
    runs = {r["run"]: (r["device"], r["versions"], r["shape"], f"{r['matmul_tflops']:.3g}", f"{r['copy_gbs']:,.0f}", r["command"])
            for r in records}  # fmt: skip
    number = {run: i for i, run in enumerate(sorted(runs), 1)}
    described = (f"{number[run]}. {run}: {d} ({v}); {s}; matmul {m} TFLOP/s and copy {c} GB/s measured; `{cmd}`"
                 for run, (d, v, s, m, c, cmd) in sorted(runs.items()))  # fmt: skip
    lines = ["Runs (ratios compare rows of one run only):", *described,
             "", "One step: forward, next-token cross-entropy, backward, fused AdamW; bf16 autocast (CUDA), fp32 weights; "
             "byte vocabulary, tied embeddings. vs attn: tok/s over mmeff attn's; vs peer: an mmeff row "
             "over its peer's (hf_llama, fla_*, mamba_ssm); vs dense: a MoE row over its dense twin. floor: matmul "
             "FLOPs at the measured matmul rate + the mixers' kernel floor + AdamW's bytes at the measured copy rate "
             "(benchmarks/lm_train_speed.py says how); MFU: model FLOPs over ms x the measured matmul rate.", ""]  # fmt: skip
    profiled = any("profile_ms" in r for r in records)
    hosted = any("host_ms" in r for r in records)
    columns = ["row", "run", "docs", "mode", "B", "tok/s", "vs attn", "vs peer", "vs dense", "peak GiB", "ms", "floor ms",
               "ms / floor", "MFU", "params M", *(f"{k} ms" for k in KINDS if profiled), *(["host ms"] if hosted else []),
               "note"]  # fmt: skip
    for T in dict.fromkeys(r["T"] for r in records):
        lines += [f"### T = {T}", "", "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 2) + "---|"]
        for r in (r for r in records if r["T"] == T):
            cells = [r["row"], str(number[r["run"]]), str(r["docs"]), mode(r), str(r["B"])]
            if r.get("tok_s"):
                cells += [f"{r['tok_s']:,.0f}", _num(r.get("vs_attn"), "{:.2f}x"), _num(r.get("vs_peer"), "{:.2f}x"),
                          _num(r.get("vs_dense"), "{:.2f}x"), _num(r.get("peak_gib"), "{:.1f}"), f"{r['ms']:.1f}",
                          _num(r.get("floor_ms"), "{:.1f}"), _num(r.get("over_floor"), "{:.2f}"),
                          _num(r.get("mfu"), "{:.0%}"), _num(r.get("params_m"), "{:.1f}")]  # fmt: skip
            else:
                cells += [""] * 10
            if profiled:
                cells += [_num(r.get("profile_ms", {}).get(k) if "profile_ms" in r else None, "{:.1f}") for k in KINDS]
            if hosted:
                cells.append(_num(r.get("host_ms"), "{:.1f}"))
            lines.append("| " + " | ".join(cells + [r.get("note", "")]) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """tok/s against T, unpacked rows, a panel per mode (eager, compiled, graphs); peers dashed (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    latest = {(r["row"], r["T"], mode(r)): r for r in sorted(records, key=lambda r: r["run"]) if r.get("tok_s") and not r["docs"]}
    points = list(latest.values())  # each row's newest run
    modes = [m for m in MODES if any(mode(r) == m for r in points)]
    if not modes:
        return
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
    colors = plt.get_cmap("tab20")
    for ax, shown in zip(axes[0], modes):
        for i, row in enumerate(ORDER):
            xy = sorted((r["T"], r["tok_s"]) for r in points if r["row"] == row and mode(r) == shown)
            if xy:
                ax.plot(*zip(*xy), marker="o", label=row, color=colors(i), linestyle="--" if row in PEERS else "-")
        lengths = sorted({r["T"] for r in points})
        ax.set(title=f"{shown}; {points[0]['device']}", xscale="log", yscale="log",
               xlabel="sequence length T (about 16k tokens per step)", ylabel="training tokens/s")  # fmt: skip
        ax.set_xticks(lengths, [str(t) for t in lengths])
        ax.minorticks_off()
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def versions() -> str:
    """torch, Triton and the peers' package versions present, and the commit when run from a git checkout."""
    names = ["torch", "triton", "transformers", "flash-linear-attention", "mamba-ssm"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    root = Path(__file__).resolve().parents[1]
    try:
        git = ["git", "rev-parse", "--show-toplevel", "--short", "HEAD"]
        top, commit = subprocess.run(git, capture_output=True, text=True, cwd=root, check=True).stdout.split()
        if Path(top).resolve() == root:  # not the commit of a repository this copy merely lies in (an exported tree)
            found.append(f"mmeff {commit}")
    except (OSError, ValueError, subprocess.CalledProcessError):
        pass
    return ", ".join(found)


def warm(rows: list[str], args: argparse.Namespace, shape: Shape) -> None:
    """Step every row at a small T, one child process per row, `--warm-jobs` at a time, so that the timed rows find
    their kernels in Triton's on-disk cache (one process compiles one kernel after another). A child runs the batch
    kinds the timed run needs, B = 1 and B > 1 (Triton compiles a size of 1 apart), at lengths whose multiples of 16
    match the real ones. The children do not keep autotuning results (TRITON_CACHE_AUTOTUNING=0): tuned while other
    processes share the GPU they could pick slower configs; the timed run tunes each kernel alone, from compiled binaries."""
    t = min(1024, *(args.T or shape.lengths))
    lengths = sorted({t if shape.tokens // T > 1 else 2 * t for T in args.T or shape.lengths})  # B = 2, B = 1
    base = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--T", *map(str, lengths),
            "--tokens", str(2 * t), "--warmup", "1", "--iters", "1", "--docs", *map(str, args.docs),
            *(["--compile", args.compile] if args.compile else [])]  # fmt: skip
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lm_train_speed_warm_") as tmp:
        commands = [[*base, "--rows", row, "--out", f"{tmp}/{row}"] for row in rows]
        done = run_in_parallel(commands, args.warm_s, args.warm_jobs, {"TRITON_CACHE_AUTOTUNING": "0"})
    print(f"warm-up: {done} of {len(commands)} rows stepped in child processes in {time.monotonic() - start:.0f} s",
          flush=True)  # fmt: skip


def select(names: list[str] | None) -> list[str]:
    """The rows named, in the order given (a call that may be cut runs the rows it needs most first) but the peers
    after every mmeff row; default all but the variants (VARIANTS). The tables list rows in their own order.

    Why peers last: on the H200 an mmeff row run after hf_llama in the same process queued its step slower than one
    run after mmeff attn (RetNet at T=4096: 151,356 and 183,764 tok/s after it, 242,956 after attn, on three
    machines; lm_train_speed_h200.md runs 12-14), while hf_llama's own figure did not depend on what ran before it.
    """
    if not names:
        names = DEFAULT_ROWS
    unknown = [n for n in names if n not in ORDER and not pattern_of(n)]
    if unknown:
        raise SystemExit(f"lm_train_speed: unknown row(s) {', '.join(unknown)}; rows: {', '.join(ORDER)} (an mmeff "
                         f"row may end in {' or '.join(CHECKPOINT)})")  # fmt: skip
    names = list(dict.fromkeys(names))
    return [n for n in names if n not in PEERS] + [n for n in names if n in PEERS]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", "--mixers", nargs="+", help=f"rows to run, in this order (default all but {', '.join(VARIANTS)}): "
                   f"{', '.join(ORDER)}; an mmeff row may end in {', '.join(CHECKPOINT)} (backbone.checkpoint)")  # fmt: skip
    p.add_argument("--T", type=int, nargs="+", help="sequence lengths (default 2048 4096 16384 65536; cpu: 64)")
    p.add_argument("--tokens", type=int, help="tokens per step: B = max(1, tokens // T) (default 16384; cpu: 128)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: tiny sizes, fp32 (a smoke test)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--iters", type=int, default=5, help="timed steps; the median counts")
    add_compile_argument(p, "the peers")
    p.add_argument("--graphs", action="store_true", help="forward + backward of the mmeff rows as CUDA graphs (unpacked only)")
    p.add_argument("--docs", type=int, nargs="+", default=[0], help="packed documents per sequence (0: none); peers: 0 only")
    p.add_argument("--profile", action="store_true",
                   help="add the GPU time per kernel category and the longest kernels of one step (CUDA)")
    p.add_argument("--warm", action="store_true", help="first step every row in parallel child processes (see warm)")
    p.add_argument("--warm-s", type=float, default=240.0, help="time limit of the warm-up")
    p.add_argument("--warm-jobs", type=int, default=8, help="child processes at a time in the warm-up")
    p.add_argument("--out", type=Path, help="path stem of .md/.json/.png (default benchmarks/results/lm_train_speed_<device>)")
    args = p.parse_args()
    if args.compile and args.graphs:
        p.error("--graphs and --compile are separate modes: run them one after the other")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lm_train_speed: no CUDA device; --device cpu runs the tiny smoke sizes")
    shape = replace(SMOKE if device.type == "cpu" else REAL, **({"tokens": args.tokens} if args.tokens else {}))
    out = args.out or Path(__file__).parent / "results" / f"lm_train_speed_{device_tag(device)}"
    out = out.with_suffix("") if out.suffix in (".md", ".json", ".png") else out
    args.rate = matmul_rate(device, 8192 if device.type == "cuda" else 256)
    args.bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**24)
    args.ours = mmeff_kernels() if args.profile and device.type == "cuda" else set()
    records = load(out.with_suffix(".json"))
    run = {"run": run_id(records), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "versions": versions(), "shape": f"{shape.depth} layers, width {shape.dim}, SwiGLU {shape.ffn_hidden}",
           "matmul_tflops": args.rate / 1e12, "copy_gbs": args.bandwidth / 1e9,
           "command": " ".join(["python", *sys.argv])}  # fmt: skip
    print(f"{run['device']}: matmul {args.rate / 1e12:.3g} TFLOP/s, copy {args.bandwidth / 1e9:,.0f} GB/s; "
          f"writing {out}.{{md,json,png}}", flush=True)  # fmt: skip
    if args.warm:
        warm(select(args.rows), args, shape)
    for T, row, ndocs in itertools.product(args.T or shape.lengths, select(args.rows), args.docs):
        if ndocs and row in PEERS:
            continue
        print(f"{row}, T {T}, docs {ndocs}: measuring", flush=True)  # a run cut short says which row it was in
        record = {**measure(row, T, ndocs, shape, args, device), **run}
        records.append(record)  # earlier runs' records stay: each run is a table of its own ratios
        relate(records)
        write(records, out)
        shown = ("row", "T", "B", "tok_s", "vs_attn", "vs_peer", "peak_gib", "floor_ms", "mfu", "note")
        print(json.dumps({k: record.get(k) for k in shown}), flush=True)


if __name__ == "__main__":
    main()
