"""`mmeff generate | chat`: sample from an LM, captioner or diffusion checkpoint; chat with an LM."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, TextIO

from mmeff.commands import command
from mmeff.config import ConfigError

DIFFUSION_FLAGS = {"--steps": "steps", "--gen-len": "gen_len", "--block-len": "block_len", "--remasking": "remasking"}
DIFFUSION_TASKS = ("diffusion", "diffusion_caption")
MEDIA = """an input for --image / --audio:
  a captioner reads the kind of file its training shards hold; write one from the held-out split:
    mmeff sample data/digit_scenes --index 3      # ./test000003.png (and its caption test000003.txt)
  (spoken-sentences shards hold .flac files the same way, for an audio captioner)."""


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    """The flags of `mmeff.generate.Sampling` (unset ones keep its defaults)."""
    p.add_argument("--max-new-tokens", type=int, help="default 128")
    p.add_argument("--temperature", type=float, help="default 1.0; 0 is greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability mass")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages tokens already in the context")
    p.add_argument("--stop", action="append", help="stop string (repeatable), trimmed from the output")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--greedy", action="store_true", default=None, help="always take the most likely token")


def sampling_from_args(args: argparse.Namespace) -> Any:
    """The `mmeff.generate.Sampling` of the sampling flags that were given."""
    from mmeff.generate import Sampling

    names = [f.name for f in fields(Sampling)]
    return Sampling(**{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint folder")
    p.add_argument("--prompt", help="text to continue (with --image/--audio: the start of the caption)")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--image", help="image file to caption (caption checkpoint)")
    media.add_argument("--audio", help="audio file to caption or transcribe (caption checkpoint)")
    _sampling_flags(p)
    p.add_argument("--sampler", choices=["ar", "diffusion"], default="ar", help="ar: token by token; diffusion: parallel unmasking")
    p.add_argument("--steps", type=int, help="diffusion: forward passes in all (default: --gen-len)")
    p.add_argument("--gen-len", type=int, help="diffusion: answer tokens (default: --max-new-tokens or 128; captions: max_len - 1)")
    p.add_argument("--block-len", type=int, help="diffusion: semi-autoregressive block length (default: one block)")
    p.add_argument("--remasking", choices=["low_confidence", "random"], help="diffusion: which predictions each step commits")


@command(
    "generate", "continue a prompt with an LM checkpoint, or caption an image/audio file (streams text, then tokens/s)",
    _generate_arguments, notes=MEDIA,
    examples=[
        'mmeff generate runs/python_docs_gla/export --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-p 0.9',
        "mmeff generate runs/digit_scenes/export --image scene.png",
        'mmeff generate runs/python_docs_mdlm/export --sampler diffusion --prompt "def " --gen-len 64 --steps 32',
    ],
)
def generate(args: argparse.Namespace) -> int:
    if args.sampler == "diffusion":
        return _diffusion(args)
    given = [flag for flag, name in DIFFUSION_FLAGS.items() if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"generate: {', '.join(given)} need --sampler diffusion")
    if args.image or args.audio:
        return _caption(args)
    if args.prompt is None:
        raise ConfigError("generate: give --prompt TEXT (LM), or --image/--audio FILE (captioner)")
    from mmeff.checkpoint import load_lm
    from mmeff.generate import encode_prompt, generate as run

    model, tok = load_lm(args.ckpt)
    result = run(model, [encode_prompt(tok, args.prompt)], sampling_from_args(args), tok, on_text=_writer(sys.stdout))
    print(flush=True)
    print(result.speed(), file=sys.stderr)
    return 0


def _writer(out: TextIO) -> Any:
    def write(index: int, piece: str) -> None:
        out.write(piece)
        out.flush()

    return write


def media_input(cfg: Any, args: argparse.Namespace) -> Any:
    """The `--image` / `--audio` file of `args` as the captioner's input batch of one (its encoder must read that kind)."""
    from mmeff.tasks.caption import make_transform, media_sample

    kind = "image" if args.image else "audio"
    if cfg.encoder.name != kind:
        raise ConfigError(f"{args.ckpt}: the captioner reads {cfg.encoder.name}, not {kind} (use --{cfg.encoder.name})")
    return make_transform(cfg, train=False).media(media_sample(cfg, args.image or args.audio))[None]


def _caption_tokenizer(cfg: Any, ckpt: str) -> Any:
    from mmeff.encoders.text import TOKENIZER_FILE, load_tokenizer
    from mmeff.tasks.caption import text_config

    path = Path(ckpt)
    return load_tokenizer(path if (path / TOKENIZER_FILE).is_file() else text_config(cfg.task))


def _caption(args: argparse.Namespace) -> int:
    """`mmeff generate CKPT --image FILE` (or `--audio FILE`): print the caption, then the speed to stderr."""
    from mmeff import checkpoint
    from mmeff.tasks.caption import caption

    cfg = checkpoint.load_config(args.ckpt)
    if cfg.task.name != "caption":
        hint = " (sample it with --sampler diffusion)" if cfg.task.name == "diffusion_caption" else ""
        raise ConfigError(f"{args.ckpt}: task {cfg.task.name!r} is not an autoregressive captioner{hint}")
    inputs = media_input(cfg, args)
    model = checkpoint.load(args.ckpt)
    sampling = sampling_from_args(args)
    if args.max_new_tokens is None:
        sampling.max_new_tokens = cfg.task.max_new_tokens or cfg.task.max_len
    if args.temperature is None and args.top_k is None and args.top_p is None:
        sampling.greedy = True  # a caption is the most likely text unless sampling is asked for
    start = time.perf_counter()
    text = caption(model, inputs, _caption_tokenizer(cfg, args.ckpt), sampling, prompt=args.prompt or "")[0]
    print(text, flush=True)
    print(f"captioned in {time.perf_counter() - start:.3f}s", file=sys.stderr)
    return 0


def _diffusion(args: argparse.Namespace) -> int:
    """`--sampler diffusion` with `--prompt TEXT` (diffusion LM) or `--image/--audio FILE` (diffusion captioner):
    print the text, then forward passes per token and tokens/s to stderr."""
    import torch

    from mmeff import checkpoint
    from mmeff.diffusion_sampling import DiffusionSampling, diffusion_generate
    from mmeff.encoders.text import TOKENIZER_FILE, load_tokenizer
    from mmeff.generate import encode_prompt

    cfg = checkpoint.load_config(args.ckpt)
    if cfg.task.name not in DIFFUSION_TASKS:
        raise ConfigError(f"{args.ckpt}: task {cfg.task.name!r} is not a diffusion model; --sampler diffusion needs a "
                          f"{' or '.join(DIFFUSION_TASKS)} checkpoint (use --sampler ar)")
    captioner = cfg.task.name == "diffusion_caption"
    if captioner != bool(args.image or args.audio):
        raise ConfigError(f"{args.ckpt}: a {cfg.task.name} checkpoint samples from "
                          f"{'--image/--audio FILE' if captioner else '--prompt TEXT'}")
    path = Path(args.ckpt)
    if captioner:
        tokenizer = _caption_tokenizer(cfg, args.ckpt)
    else:
        tokenizer = load_tokenizer(path if (path / TOKENIZER_FILE).is_file() else cfg.encoder)
    inputs = media_input(cfg, args) if captioner else None
    model = checkpoint.load(args.ckpt)
    if captioner:
        prompt = [tokenizer.bos_id, *tokenizer.encode(args.prompt or "")]
        default_len = cfg.task.max_len - len(prompt)
    else:
        prompt = encode_prompt(tokenizer, args.prompt or "")
        default_len = args.max_new_tokens or 128
    sampling = DiffusionSampling(
        gen_len=args.gen_len or default_len,
        steps=args.steps,
        block_len=args.block_len,
        remasking=args.remasking or "low_confidence",
        temperature=args.temperature or 0.0,
        seed=args.seed,
    )
    prefix = model.encode_media(inputs) if captioner else None
    result = diffusion_generate(model, torch.tensor([prompt]), tokenizer, sampling, prefix)
    print((args.prompt or "") + result.texts[0] if captioner else result.texts[0], flush=True)
    print(result.speed(), file=sys.stderr)
    return 0


CHAT_COMMANDS = {"/help": "list these commands", "/reset": "forget the conversation so far", "/quit": "leave (also /exit, Ctrl-D)"}
CHAT_HELP = "\n".join(f"  {name:7s} {what}" for name, what in CHAT_COMMANDS.items())


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint folder of a text LM (task.name: lm)")
    _sampling_flags(p)


@command(
    "chat", "interactive chat with an LM checkpoint: one line per turn from stdin; /help lists the commands", _chat_arguments,
    notes="commands (a line starting with one is not sent to the model):\n" + CHAT_HELP
    + "\nCtrl-C stops the reply being written; Ctrl-C at the prompt (or Ctrl-D) leaves.",
    examples=["mmeff chat runs/python_docs_gla/export --temperature 0.7 --top-p 0.9"],
)
def chat(args: argparse.Namespace) -> int:
    """Each stdin line is a user turn, the reply streams; the conversation so far is the prompt."""
    from mmeff import checkpoint
    from mmeff.generate import ASSISTANT, USER, encode_prompt, generate as run

    inp, out, err = sys.stdin, sys.stdout, sys.stderr
    if hasattr(inp, "reconfigure"):  # bytes that are not UTF-8 reach encode_prompt, which names them
        inp.reconfigure(errors="surrogateescape")
    model, tok = checkpoint.load_lm(args.ckpt)
    sampling = sampling_from_args(args)
    sampling.stop = [*sampling.stop, f"\n{USER}"]
    # The conversation is re-read every turn, keeping the last tokens that fit the trained context.
    keep = max(1, checkpoint.load_config(args.ckpt).encoder.seq_len - sampling.max_new_tokens)
    conversation = ""
    interactive = inp.isatty()
    while True:
        try:
            if interactive:
                err.write("> ")
                err.flush()
            line = inp.readline()
        except KeyboardInterrupt:
            print(file=err)
            return 0
        if not line:
            return 0
        text = line.rstrip("\n")
        word = text.strip().split(" ")[0].lower()
        if word.startswith("/"):
            if word in ("/quit", "/exit"):
                return 0
            if word == "/reset":
                conversation = ""
                print("(conversation forgotten)", file=err)
            else:
                print(("" if word == "/help" else f"unknown command {word}; ") + "commands:\n" + CHAT_HELP, file=err)
            continue
        turn = f"{USER} {text}\n{ASSISTANT}"
        try:
            result = run(model, [encode_prompt(tok, conversation + turn)[-keep:]], sampling, tok, on_text=_writer(out))
        except KeyboardInterrupt:
            print("\n(reply stopped)", file=err)
            continue  # the interrupted turn is dropped from the conversation
        print(file=out, flush=True)
        conversation += turn + result.texts[0] + "\n"
        if interactive:
            print(result.speed(), file=err)
