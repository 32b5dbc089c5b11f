"""`torch.export` of a model's forward (classifier: images -> logits, LM: token ids -> logits), and ONNX through it.

One program serves every batch size (1..1024) and every sequence length of `dynamic_shapes`: text from
MIN_LENGTH to `max_length` tokens, images of 2 patches to 4x the trained number per side. A one-token
forward is the decoding step (the linear mixers' recurrent mode), another graph: hence MIN_LENGTH = 2.
The chunked recurrences trace whole chunks and a scan over their number (`mmeff.ops.recurrence._chunked`);
shape facts that hold for every length but that export's solver cannot prove are checked at run time
(`prefer_deferred_runtime_asserts_over_guards`) instead of fixing the graph to the example's length.
Export on CPU: the program then holds the plain-PyTorch ops, which run anywhere (no mmeff kernels).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from mmeff.config import ConfigError, RunConfig

MIN_LENGTH = 2
MAX_BATCH = 1024
IMAGE_SCALE = 4  # the largest image side is IMAGE_SCALE times the trained one

Shapes = tuple[dict[int, Dim]]


def example_input(cfg: RunConfig, batch: int = 2, length: int | None = None) -> Tensor:
    """An input of the model of `cfg`: token ids [batch, length or seq_len], or images [batch, C, length or H, length or W]."""
    enc = cfg.encoder
    if enc.name == "text":
        return torch.randint(0, enc.vocab_size, (batch, length or enc.seq_len))
    if enc.name == "image":
        side = length or enc.image_size
        return torch.rand(batch, enc.in_chans, side, side)
    raise ConfigError(f"export: encoder.name {enc.name!r}; exporting takes text LMs and image classifiers")


def dynamic_shapes(cfg: RunConfig, max_length: int | None = None) -> Shapes:
    """Batch 1..MAX_BATCH and the sequence: text MIN_LENGTH..max_length (default encoder.seq_len) tokens; image
    sides of 2..IMAGE_SCALE x image_size / patch_size whole patches (one row or column traces another graph)."""
    enc = cfg.encoder
    batch = Dim("batch", min=1, max=MAX_BATCH)
    if enc.name == "image":
        patches = IMAGE_SCALE * enc.image_size // enc.patch_size
        rows, cols = Dim("rows", min=2, max=patches), Dim("cols", min=2, max=patches)
        return ({0: batch, 2: enc.patch_size * rows, 3: enc.patch_size * cols},)
    max_length = max_length or enc.seq_len
    if max_length < MIN_LENGTH:
        raise ConfigError(f"export: max_length {max_length}; it must be at least {MIN_LENGTH}")
    return ({0: batch, 1: Dim("length", min=MIN_LENGTH, max=max_length)},)


def export_program(model: nn.Module, cfg: RunConfig | None = None, max_length: int | None = None) -> ExportedProgram:
    """`torch.export.export` of `model.forward` in eval mode for the inputs of `dynamic_shapes(cfg, max_length)`
    (cfg: the model's run config by default)."""
    cfg = cfg or model.run_config
    shapes = dynamic_shapes(cfg, max_length)
    example = example_input(cfg, batch=2, length=max_length if cfg.encoder.name == "text" else None)
    return torch.export.export(model.eval(), (example,), dynamic_shapes=shapes, prefer_deferred_runtime_asserts_over_guards=True)


def export_onnx(program: ExportedProgram, path: str | Path) -> Path:
    """Write the ONNX file of an exported program (torch.onnx's exporter; needs onnx and onnxscript), input 'input'."""
    onnx_program = torch.onnx.export(program, dynamo=True, input_names=["input"], output_names=["logits"])
    return _write(Path(path), onnx_program.save)


def save_program(program: ExportedProgram, path: str | Path) -> Path:
    """Write `program` as a .pt2 file (`torch.export.load` reads it)."""
    return _write(Path(path), lambda tmp: torch.export.save(program, tmp))


def max_difference(program: ExportedProgram, model: nn.Module, inputs: list[Tensor]) -> float:
    """The largest |exported - eager| logit over `inputs` (e.g. several lengths)."""
    with torch.no_grad():
        return max((program.module()(x) - model.eval()(x)).abs().max().item() for x in inputs)


def _write(path: Path, save: object) -> Path:
    """Run `save(tmp)` into a temporary file next to `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save(tmp)  # type: ignore[operator]
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
