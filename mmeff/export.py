"""`torch.export` of a model's forward (classifier: images -> logits, LM: token ids -> logits), and ONNX through it.

The batch size stays dynamic; the sequence length (text) and image size are those of the example input:
the chunked recurrences of the linear and SSM mixers pad the sequence to whole chunks, and export then
specialises on the length (`mmeff.ops.recurrence._chunked`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from mmeff.config import ConfigError, RunConfig


def example_input(cfg: RunConfig, batch: int = 2, length: int | None = None) -> Tensor:
    """An input of the model of `cfg`: token ids [batch, length or seq_len], or images [batch, C, H, W]."""
    enc = cfg.encoder
    if enc.name == "text":
        return torch.randint(0, enc.vocab_size, (batch, length or enc.seq_len))
    if enc.name == "image":
        return torch.rand(batch, enc.in_chans, enc.image_size, enc.image_size)
    raise ConfigError(f"export: encoder.name {enc.name!r}; exporting takes text LMs and image classifiers")


def _batch_dynamic() -> tuple[dict[int, Dim]]:
    return ({0: Dim("batch", min=1, max=1024)},)


def export_program(model: nn.Module, example: Tensor) -> ExportedProgram:
    """`torch.export.export` of `model.forward(example)` in eval mode, any batch size."""
    return torch.export.export(model.eval(), (example,), dynamic_shapes=_batch_dynamic())


def export_onnx(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """The ONNX file of `model.forward` (torch.onnx's exporter on top of torch.export; needs onnx and onnxscript)."""
    path = Path(path)
    program = torch.onnx.export(
        model.eval(), (example,), dynamo=True, dynamic_shapes=_batch_dynamic(), input_names=["input"], output_names=["logits"]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path
