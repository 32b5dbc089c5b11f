"""`mmeff convert hf SRC OUT`: a Hugging Face model folder as an mmeff checkpoint."""

from __future__ import annotations

import argparse

from mmeff.commands import command


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=["hf"])
    p.add_argument("src", help="Hugging Face model folder (config.json + safetensors weights)")
    p.add_argument("out", help="checkpoint folder to write")


@command(
    "convert", "import a Hugging Face LlamaForCausalLM / Mamba2ForCausalLM folder as an mmeff checkpoint", _arguments,
    examples=["mmeff convert hf path/to/hf_model out/mmeff_model", 'mmeff generate out/mmeff_model --prompt "Hello"'],
)
def convert(args: argparse.Namespace) -> int:
    from mmeff.convert import convert_hf

    print(f"converted {args.src} to the mmeff checkpoint {convert_hf(args.src, args.out)}")
    return 0
