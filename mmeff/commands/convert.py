"""`mmeff convert hf SRC OUT`: a Hugging Face model folder as an mmeff checkpoint; `mmeff convert to-hf CKPT OUT`: back."""

from __future__ import annotations

import argparse

from mmeff.commands import command


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=["hf", "to-hf"], help="hf: Hugging Face -> mmeff; to-hf: mmeff attn LM -> Llama")
    p.add_argument("src", help="hf: Hugging Face model folder (config.json + safetensors); to-hf: mmeff checkpoint folder")
    p.add_argument("out", help="folder to write")


@command(
    "convert", "import a Hugging Face LlamaForCausalLM / Mamba2ForCausalLM folder, or export an attn LM as Llama", _arguments,
    examples=[
        "mmeff convert hf path/to/hf_model out/mmeff_model",
        'mmeff generate out/mmeff_model --prompt "Hello"',
        "mmeff convert to-hf runs/python_docs_attn/export out/llama  # transformers.AutoModelForCausalLM loads it",
    ],
)
def convert(args: argparse.Namespace) -> int:
    from mmeff.convert import convert_hf, convert_to_hf

    if args.format == "to-hf":
        print(f"converted {args.src} to the Hugging Face Llama folder {convert_to_hf(args.src, args.out)}")
        return 0
    print(f"converted {args.src} to the mmeff checkpoint {convert_hf(args.src, args.out)}")
    return 0
