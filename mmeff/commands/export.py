"""`mmeff export CKPT OUT`: the checkpoint's forward as a torch.export program (.pt2) or an ONNX file (.onnx)."""

from __future__ import annotations

import argparse

from mmeff.commands import command

SUFFIXES = (".pt2", ".onnx")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint folder of a text LM or an image classifier")
    p.add_argument("out", help="file to write: .pt2 (torch.export.load reads it) or .onnx")
    p.add_argument("--max-length", type=int, help="longest input in tokens, LMs (default: the trained encoder.seq_len)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


@command(
    "export", "export a checkpoint's forward (any batch size and length) as a torch.export program or ONNX", _arguments,
    examples=[
        "mmeff export runs/python_docs_gla/export out/gla.pt2 --max-length 1024",
        "mmeff export runs/digits/export out/digits.onnx   # images of 2 patches up to 4x the trained side",
    ],
    notes="The program takes token ids [B, T] (2 <= T <= --max-length) or images [B, C, H, W] (H, W multiples\n"
    "of the patch size, from 2 patches to 4x the trained size), any B up to 1024, and returns the logits.\n"
    "It is checked against the eager model at the shortest and longest input before it is written.",
)
def export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmeff import checkpoint
    from mmeff.errors import ConfigError, MmeffError
    from mmeff.export import MIN_LENGTH, example_input, export_onnx, export_program, max_difference, save_program

    out = Path(args.out)
    if out.suffix not in SUFFIXES:
        raise ConfigError(f"OUT {out}: name a .pt2 or .onnx file")
    if out.exists() and not args.overwrite:
        raise MmeffError(f"{out} exists; pass --overwrite to replace it")
    model, cfg = checkpoint.load(args.ckpt), checkpoint.load_config(args.ckpt)
    program = export_program(model, cfg, args.max_length)
    if cfg.encoder.name == "text":
        extremes = [example_input(cfg, length=n) for n in (MIN_LENGTH, args.max_length or cfg.encoder.seq_len)]
    else:
        extremes = [example_input(cfg, length=n) for n in (2 * cfg.encoder.patch_size, cfg.encoder.image_size * 4)]
    diff = max_difference(program, model, extremes)
    written = save_program(program, out) if out.suffix == ".pt2" else export_onnx(program, out)
    shape = "x".join(str(n) for n in extremes[-1].shape[1:])
    print(f"exported {args.ckpt} to {written} (inputs up to [1024, {shape}]; max |exported - eager| {diff:.2e})")
    return 0
