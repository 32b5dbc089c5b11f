"""Hugging Face causal LMs <-> mmeff checkpoint folders: LlamaForCausalLM (attn + swiglu) both ways, Mamba2ForCausalLM (mamba2) in.

Only safetensors weights are read (nothing is unpickled). The Hugging Face config maps onto an
`lm` run config; every weight must find its place, and every mmeff parameter must be filled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from mmeff import checkpoint, config
from mmeff.config import ConfigError
from mmeff.encoders.text import TOKENIZER_FILE
from mmeff.tasks import build_model

log = logging.getLogger("mmeff")

Converted = tuple[dict[str, Any], dict[str, Tensor], float]  # (backbone config, mmeff state dict, HF norm eps)


class _Weights:
    """The Hugging Face tensors by name; `take` removes one, so that leftovers can be reported."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = dict(tensors)

    def take(self, name: str) -> Tensor:
        """The tensor `name` (removed from the pool); a clear error if the file lacks it."""
        if name not in self.tensors:
            raise ConfigError(f"Hugging Face weights lack {name!r}; is the config's architecture right?")
        return self.tensors.pop(name)

    def linear(self, state: dict[str, Tensor], src: str, dst: str) -> None:
        """Move a Linear's weight (and bias, when there is one) from `src` to `dst`."""
        state[f"{dst}.weight"] = self.take(f"{src}.weight")
        if f"{src}.bias" in self.tensors:
            state[f"{dst}.bias"] = self.take(f"{src}.bias")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"cannot convert: {message}")


def _number(x: Any) -> float:
    # transformers writes non-finite floats into config.json as {"__float__": "Infinity"}.
    return float(x["__float__"] if isinstance(x, dict) else x)


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers 5 nests RoPE settings in rope_parameters; 4.x had rope_theta and rope_scaling.
    rope = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 10000.0)}
    kind = rope.get("rope_type", rope.get("type", "default"))
    _require(kind == "default", f"RoPE type {kind!r} (scaled RoPE); mmeff attention has plain RoPE only")
    return float(rope.get("rope_theta", 10000.0))


def _llama(hf: dict[str, Any], w: _Weights) -> Converted:
    dim, heads, depth = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    kv_heads = hf.get("num_key_value_heads") or heads
    _require(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r}; mmeff's swiglu uses silu")
    head_dim = hf.get("head_dim") or dim // heads
    _require(head_dim * heads == dim, f"head_dim {head_dim} x {heads} heads != hidden_size {dim}")
    _require(hf.get("pretraining_tp", 1) == 1, "pretraining_tp > 1")
    attn_bias = bool(hf.get("attention_bias", False))
    backbone = {
        "dim": dim,
        "pattern": ["attn"],
        "depth": depth,
        "causal": True,
        "ffn": "swiglu",
        "ffn_options": {"hidden": hf["intermediate_size"], "bias": bool(hf.get("mlp_bias", False))},
        "norm": "rmsnorm",
        "mixers": {"attn": {"heads": heads, "kv_heads": kv_heads, "rope_base": _rope_theta(hf), "bias": attn_bias}},
    }
    state = {"encoder.embed.weight": w.take("model.embed_tokens.weight")}
    state["backbone.norm.weight"] = w.take("model.norm.weight")
    for i in range(depth):
        src, dst = f"model.layers.{i}.", f"backbone.layers.{i}."
        state[dst + "norm1.weight"] = w.take(src + "input_layernorm.weight")
        state[dst + "norm2.weight"] = w.take(src + "post_attention_layernorm.weight")
        w.linear(state, src + "self_attn.q_proj", dst + "mixer.q")
        w.linear(state, src + "self_attn.o_proj", dst + "mixer.out")
        # mmeff's fused kv Linear holds the keys' rows first, then the values'.
        for part in ("weight", "bias") if attn_bias else ("weight",):
            k, v = w.take(f"{src}self_attn.k_proj.{part}"), w.take(f"{src}self_attn.v_proj.{part}")
            state[f"{dst}mixer.kv.{part}"] = torch.cat([k, v])
        for name in ("gate", "up", "down"):
            w.linear(state, f"{src}mlp.{name}_proj", f"{dst}ffn.{name}")
    return backbone, state, hf.get("rms_norm_eps", 1e-6)


def _mamba2(hf: dict[str, Any], w: _Weights) -> Converted:
    dim, depth, head_dim, expand = hf["hidden_size"], hf["num_hidden_layers"], hf["head_dim"], hf["expand"]
    inner = int(expand * dim)
    _require(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r}; mmeff's mamba2 uses silu")
    heads = hf["num_heads"]
    _require(heads * head_dim == inner, f"num_heads {heads} x head_dim {head_dim} != expand x hidden_size {inner}")
    low, high = (_number(x) for x in hf.get("time_step_limit", (0.0, float("inf"))))
    _require(low == 0.0 and high == float("inf"), f"time_step_limit {[low, high]}; mmeff's mamba2 does not clamp dt")
    mixer = {
        "d_state": hf["state_size"],
        "d_conv": hf["conv_kernel"],
        "expand": expand,
        "head_dim": head_dim,
        "ngroups": hf["n_groups"],
        "conv_bias": bool(hf.get("use_conv_bias", True)),
        "bias": bool(hf.get("use_bias", False)),
    }
    backbone = {"dim": dim, "pattern": ["mamba2"], "depth": depth, "causal": True, "ffn": "none", "mixers": {"mamba2": mixer}}
    state = {"encoder.embed.weight": w.take("backbone.embeddings.weight")}
    state["backbone.norm.weight"] = w.take("backbone.norm_f.weight")
    for i in range(depth):
        src, dst = f"backbone.layers.{i}.", f"backbone.layers.{i}."
        state[dst + "norm1.weight"] = w.take(src + "norm.weight")
        w.linear(state, src + "mixer.in_proj", dst + "mixer.in_proj")
        w.linear(state, src + "mixer.conv1d", dst + "mixer.conv.conv")
        w.linear(state, src + "mixer.out_proj", dst + "mixer.out")
        for name in ("dt_bias", "A_log", "D", "norm.weight"):
            state[dst + "mixer." + name] = w.take(src + "mixer." + name)
    return backbone, state, hf.get("layer_norm_epsilon", 1e-5)


CONVERTERS: dict[str, Callable[[dict[str, Any], _Weights], Converted]] = {"llama": _llama, "mamba2": _mamba2}


def _read_weights(src: Path) -> dict[str, Tensor]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{src}: no model.safetensors(.index.json); only safetensors weights are read (no pickle)")
    tensors: dict[str, Tensor] = {}
    for name in files:
        tensors.update(load_file(str(src / name)))
    return tensors


def _warn_eps(model: nn.Module, eps: float) -> None:
    """Log the mmeff norms whose epsilon differs from the Hugging Face model's (not a config option in mmeff)."""
    differ: dict[str, float] = {}
    for name, m in model.named_modules():
        if isinstance(getattr(m, "eps", None), float) and m.eps != eps:
            differ.setdefault(type(m).__name__, m.eps)
    for kind, own in differ.items():
        log.warning("the model's norms use eps=%g, mmeff's %s uses eps=%g (no option sets it): logits differ", eps, kind, own)


def convert_hf(src: str | Path, out: str | Path) -> Path:
    """Write the Hugging Face model folder `src` (config.json + safetensors) as the mmeff checkpoint folder `out`."""
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json; expected a Hugging Face model folder")
    hf = json.loads((src / "config.json").read_text())
    kind = hf.get("model_type")
    if kind not in CONVERTERS:
        raise ConfigError(f"cannot convert model_type {kind!r}; supported: {', '.join(CONVERTERS)}")
    weights = _Weights(_read_weights(src))
    backbone, state, eps = CONVERTERS[kind](hf, weights)
    tie = bool(hf.get("tie_word_embeddings", False))
    state["head.weight"] = state["encoder.embed.weight"] if tie else weights.take("lm_head.weight")
    weights.tensors.pop("lm_head.weight", None)  # a tied copy some files keep
    leftover = [k for k in weights.tensors if not k.endswith("rotary_emb.inv_freq")]
    _require(not leftover, f"weights with no place in the mmeff model: {leftover[:5]}")
    has_tokenizer = (src / TOKENIZER_FILE).is_file()
    # The tokenizer travels in the checkpoint folder, which is where the config points.
    encoder = {"name": "text", "tokenizer": "bpe", "tokenizer_path": str(out.absolute())}
    if not has_tokenizer:
        encoder = {"name": "text", "tokenizer": "byte"}
        log.warning("%s has no %s: the checkpoint gets the byte tokenizer (not the model's ids)", src, TOKENIZER_FILE)
    cfg = config.parse(
        {
            "name": src.absolute().name,
            "encoder": {**encoder, "vocab_size": hf["vocab_size"], "seq_len": hf.get("max_position_embeddings", 2048)},
            "backbone": backbone,
            "task": {"name": "lm", "tie_embeddings": tie},
        }
    )
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    _warn_eps(model, eps)
    extra = {TOKENIZER_FILE: (src / TOKENIZER_FILE).read_text()} if has_tokenizer else None
    return checkpoint.export(model, cfg, out, extra=extra)


def _export_llama(model: nn.Module, cfg: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(Llama config.json, Hugging Face state dict) of an mmeff `attn` + `swiglu` + `rmsnorm` LM; a ConfigError names
    the first config key Llama cannot express."""
    b = cfg.backbone
    _require(cfg.task.name == "lm", f"task.name {cfg.task.name!r}; only causal LMs (task.name: lm) map onto Llama")
    _require(b.ffn == "swiglu" and not b.ffn_options.get("dropout"), f"backbone.ffn {b.ffn!r}; Llama's MLP is swiglu")
    _require(b.norm == "rmsnorm" and b.final_norm, f"backbone.norm {b.norm!r} / final_norm {b.final_norm}; Llama has rmsnorm and a final norm")
    layers = model.backbone.layers
    mixers = [layer.mixer for layer in layers]
    kinds = sorted({type(m).__name__ for m in mixers})
    _require(kinds == ["Attention"], f"backbone.pattern {b.pattern}: mixers {kinds}; Llama has softmax attention (attn) only")
    first, ffn = mixers[0], layers[0].ffn
    for name in ("heads", "kv_heads", "head_dim", "rope_base"):
        values = {getattr(m, name) for m in mixers}
        _require(len(values) == 1, f"layers differ in attention {name} ({sorted(values)}); Llama has one per model")
    _require(all(m.rope and m.causal for m in mixers), "backbone.mixers.attn: rope and causal must be on")
    _require(all(isinstance(m.q_norm, nn.Identity) for m in mixers), "backbone.mixers.attn.qk_norm; Llama has no q/k norm")
    attn_bias, mlp_bias = first.q.bias is not None, ffn.gate.bias is not None
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.encoder.vocab_size,
        "hidden_size": b.dim,
        "intermediate_size": ffn.gate.out_features,
        "num_hidden_layers": len(layers),
        "num_attention_heads": first.heads,
        "num_key_value_heads": first.kv_heads,
        "head_dim": first.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.encoder.seq_len,
        "rms_norm_eps": b.norm_eps,
        "rope_theta": first.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": first.rope_base},
        "attention_bias": attn_bias,
        "mlp_bias": mlp_bias,
        "tie_word_embeddings": model.head.weight is model.encoder.embed.weight,
        "torch_dtype": "float32",
    }
    own = model.state_dict()
    state = {"model.embed_tokens.weight": own["encoder.embed.weight"], "model.norm.weight": own["backbone.norm.weight"]}
    if not hf["tie_word_embeddings"]:
        state["lm_head.weight"] = own["head.weight"]
    kv = first.kv_heads * first.head_dim
    for i in range(len(layers)):
        src, dst = f"backbone.layers.{i}.", f"model.layers.{i}."
        state[dst + "input_layernorm.weight"] = own[src + "norm1.weight"]
        state[dst + "post_attention_layernorm.weight"] = own[src + "norm2.weight"]
        parts = ("weight", "bias") if attn_bias else ("weight",)
        for part in parts:
            state[f"{dst}self_attn.q_proj.{part}"] = own[f"{src}mixer.q.{part}"]
            state[f"{dst}self_attn.o_proj.{part}"] = own[f"{src}mixer.out.{part}"]
            # mmeff's fused kv Linear holds the keys' rows first, then the values'.
            state[f"{dst}self_attn.k_proj.{part}"], state[f"{dst}self_attn.v_proj.{part}"] = own[f"{src}mixer.kv.{part}"].split(kv)
        for name in ("gate", "up", "down"):
            for part in ("weight", "bias") if mlp_bias else ("weight",):
                state[f"{dst}mlp.{name}_proj.{part}"] = own[f"{src}ffn.{name}.{part}"]
    return hf, {k: v.detach().contiguous().clone() for k, v in state.items()}


def convert_to_hf(ckpt: str | Path, out: str | Path) -> Path:
    """Write the mmeff `attn` LM checkpoint folder `ckpt` as a Hugging Face Llama folder `out` (config.json,
    model.safetensors, tokenizer.json + tokenizer_config.json) that transformers' AutoModelForCausalLM loads."""
    from safetensors.torch import save_file

    from mmeff.encoders.text import load_tokenizer

    ckpt, out = Path(ckpt), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new folder (nothing is overwritten)")
    cfg = checkpoint.load_config(ckpt)
    hf, state = _export_llama(checkpoint.load(ckpt), cfg)
    tokenizer = load_tokenizer(ckpt if (ckpt / TOKENIZER_FILE).is_file() else cfg.encoder)
    names = tokenizer.to_hf()
    special = {f"{role}_token": names.id_to_token(getattr(tokenizer, f"{role}_id")) for role in ("bos", "eos", "pad")}
    hf.update({f"{role}_token_id": getattr(tokenizer, f"{role}_id") for role in ("bos", "eos", "pad")})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / TOKENIZER_FILE).write_text(names.to_str())
        (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **special}, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
