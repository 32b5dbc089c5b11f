"""The `mmeff` command line: fit, validate, test, shards, blocks."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from mmeff.config import ConfigError

COMMANDS: dict[str, Callable[[argparse.Namespace, list[str]], int]] = {}


def command(fn: Callable[[argparse.Namespace, list[str]], int]) -> Callable[[argparse.Namespace, list[str]], int]:
    """Register `cmd_<name>` as the handler of subcommand <name>."""
    COMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


def _overrides(rest: list[str]) -> list[str]:
    bad = [a for a in rest if not a.startswith("--") or "=" not in a]
    if bad:
        raise ConfigError(f"unrecognised arguments {bad}; config overrides look like --key.path=value")
    return rest


@command
def cmd_fit(args: argparse.Namespace, rest: list[str]) -> int:
    from mmeff import config, trainer

    trainer.fit(config.load(args.config, _overrides(rest)), resume=args.resume)
    return 0


def _evaluate(args: argparse.Namespace, rest: list[str], split: str) -> int:
    from mmeff import config, trainer

    cfg = config.load(args.config, _overrides(rest))
    metrics = trainer.evaluate(cfg, args.ckpt or cfg.out_dir / "export", split)
    for key in sorted(metrics, key=lambda k: (k.endswith("acc"), k)):
        print(f"{key}: {metrics[key]:.4f}")
    return 0


@command
def cmd_validate(args: argparse.Namespace, rest: list[str]) -> int:
    return _evaluate(args, rest, "val")


@command
def cmd_test(args: argparse.Namespace, rest: list[str]) -> int:
    return _evaluate(args, rest, "test")


@command
def cmd_shards(args: argparse.Namespace, rest: list[str]) -> int:
    import yaml

    from mmeff.data import build_shards

    options = {}
    for item in args.option or []:
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value)
    counts = build_shards(args.src, args.out, source=args.source, **options)
    print(" ".join(f"{split}={n}" for split, n in counts.items()), f"samples written to {args.out}")
    return 0


@command
def cmd_blocks(args: argparse.Namespace, rest: list[str]) -> int:
    from mmeff import blocks

    for kind in ("mixer", "ffn", "norm"):
        for name in blocks.names(kind):
            print(f"{name:16s} {kind:6s} {blocks.entry(name).summary}")
    return 0


@command
def cmd_tokenizer(args: argparse.Namespace, rest: list[str]) -> int:
    from mmeff.data.text import training_texts
    from mmeff.encoders.text import train_bpe

    tokenizer = train_bpe(training_texts(args.src), args.vocab_size)
    print(f"{tokenizer.vocab_size}-token BPE tokenizer written to {tokenizer.save(args.out)}")
    return 0


@command
def cmd_audio_stats(args: argparse.Namespace, rest: list[str]) -> int:
    from mmeff import config
    from mmeff.encoders.audio import compute_stats

    mean, std = compute_stats(config.load(args.config))
    print(f"norm_mean: {mean:.6g}\nnorm_std: {std:.6g}")
    return 0


@command
def cmd_generate(args: argparse.Namespace, rest: list[str]) -> int:
    if args.sampler == "diffusion":
        from mmeff.diffusion_sampling import run_diffusion

        return run_diffusion(args)
    given = [flag for flag, name in DIFFUSION_FLAGS.items() if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"generate: {', '.join(given)} need --sampler diffusion")
    if args.image or args.audio:
        from mmeff.tasks.caption import run_caption

        return run_caption(args)
    if args.prompt is None:
        raise ConfigError("generate: give --prompt TEXT (LM), or --image/--audio FILE (captioner)")
    from mmeff.generate import run_generate

    return run_generate(args)


@command
def cmd_chat(args: argparse.Namespace, rest: list[str]) -> int:
    from mmeff.generate import run_chat

    return run_chat(args)


@command
def cmd_convert(args: argparse.Namespace, rest: list[str]) -> int:
    from mmeff.convert import convert_hf

    print(f"converted {args.src} to the mmeff checkpoint {convert_hf(args.src, args.out)}")
    return 0


DIFFUSION_FLAGS = {"--steps": "steps", "--gen-len": "gen_len", "--block-len": "block_len", "--remasking": "remasking"}


def _diffusion_flags(p: argparse.ArgumentParser) -> None:
    """The flags of `mmeff.diffusion_sampling.DiffusionSampling` (with --temperature and --seed)."""
    p.add_argument("--sampler", choices=["ar", "diffusion"], default="ar", help="ar: token by token; diffusion: parallel unmasking")
    p.add_argument("--steps", type=int, help="diffusion: forward passes in all (default: --gen-len)")
    p.add_argument("--gen-len", type=int, help="diffusion: answer tokens (default: --max-new-tokens or 128; captions: max_len - 1)")
    p.add_argument("--block-len", type=int, help="diffusion: semi-autoregressive block length (default: one block)")
    p.add_argument("--remasking", choices=["low_confidence", "random"], help="diffusion: which predictions each step commits")


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


def parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="mmeff", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="train a run config (extra --key.path=value args override it)")
    f.add_argument("config")
    f.add_argument("--resume", help="'last', a run folder or a .ckpt file to continue from")
    for name in ("validate", "test"):
        e = sub.add_parser(name, help=f"evaluate an exported checkpoint on the {name} split")
        e.add_argument("config")
        e.add_argument("--ckpt", help="checkpoint folder (default: <run_dir>/export)")
    s = sub.add_parser("shards", help="write WebDataset shards from a folder, a CSV/JSONL manifest or a bundled source")
    s.add_argument("src", nargs="?", help="folder (class/xxx.ext) or .csv/.jsonl manifest")
    s.add_argument("out", help="output folder")
    s.add_argument("--source", help="bundled data set, e.g. digits")
    s.add_argument("--option", "-o", action="append", help="source option KEY=VALUE (repeatable)")
    sub.add_parser("blocks", help="list the registered blocks")
    t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer (train text of a config or shard folder, or text/JSONL)")
    t.add_argument("action", choices=["train"])
    t.add_argument("src", help="run config (.yaml), text shard folder, or .txt/.jsonl file or folder")
    t.add_argument("--vocab-size", type=int, required=True, help="ids in all, special tokens included")
    t.add_argument("--out", required=True, help="folder to write tokenizer.json into")
    a = sub.add_parser("audio-stats", help="print the log-mel mean/std of a config's train shards (encoder.norm_mean/norm_std)")
    a.add_argument("config")
    a.set_defaults(command="audio_stats")  # the handler's name: cmd_audio_stats
    g = sub.add_parser("generate", help="continue a prompt with an LM checkpoint (streams text, then tokens/s)")
    g.add_argument("ckpt", help="checkpoint folder")
    g.add_argument("--prompt", help="text to continue (with --image/--audio: the start of the caption)")
    media = g.add_mutually_exclusive_group()
    media.add_argument("--image", help="image file to caption (caption checkpoint)")
    media.add_argument("--audio", help="audio file to caption or transcribe (caption checkpoint)")
    _sampling_flags(g)
    _diffusion_flags(g)
    c = sub.add_parser("chat", help="interactive chat with an LM checkpoint: one line per turn from stdin, EOF ends")
    c.add_argument("ckpt", help="checkpoint folder")
    _sampling_flags(c)
    v = sub.add_parser("convert", help="import a Hugging Face LlamaForCausalLM / Mamba2ForCausalLM folder as an mmeff checkpoint")
    v.add_argument("format", choices=["hf"])
    v.add_argument("src", help="Hugging Face model folder (config.json + safetensors weights)")
    v.add_argument("out", help="checkpoint folder to write")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmeff` console script."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("mmeff")  # Lightning configures its own loggers; only ours get this handler
    if not root.handlers:
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    args, rest = parser().parse_known_args(argv)
    if rest and args.command not in ("fit", "validate", "test"):
        parser().error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        return COMMANDS[args.command](args, rest)
    except (ConfigError, FileNotFoundError) as e:
        print(f"mmeff {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
