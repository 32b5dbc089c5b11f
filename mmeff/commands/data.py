"""`mmeff shards | tokenizer | audio-stats`: write shards, train a tokenizer, measure audio statistics."""

from __future__ import annotations

import argparse

from mmeff.commands import command
from mmeff.config import ConfigError


def _sources() -> str:
    """The bundled sources with their -o options, for `mmeff shards --help` (imports the light source modules)."""
    from mmeff.data import sources

    lines = ["bundled sources (--source NAME) and their options (-o KEY=VALUE, defaults shown):"]
    for entry in sources.SOURCES.entries():
        lines += [f"  {entry.name:17s} {entry.summary}", f"  {'':17s}   -o {sources.describe_options(entry.name) or '(none)'}"]
    return "\n".join(lines)


def _shards_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", nargs="?", help="folder (class/xxx.ext) or .csv/.jsonl manifest; with --source: its src option")
    p.add_argument("out", help="output folder")
    p.add_argument("--source", help="bundled data set (listed below); default: folder")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="source option (repeatable; value read as YAML)")


@command(
    "shards", "write WebDataset shards from a folder, a CSV/JSONL manifest or a bundled source", _shards_arguments, notes=_sources,
    examples=[
        "mmeff shards --source digits data/digits",
        "mmeff shards --source text -o src=my_corpus/ data/my_corpus",
        "mmeff shards --source python-docs -o tokenizer=data/bpe data/python_docs_bpe",
        "mmeff shards my_images/ data/my_images          # my_images/<class>/xxx.png",
    ],
)
def shards(args: argparse.Namespace) -> int:
    import yaml

    from mmeff.data import build_shards

    options = {}
    for item in args.option:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"-o {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    counts = build_shards(args.src, args.out, source=args.source, **options)
    print(" ".join(f"{split}={n}" for split, n in counts.items()), f"samples written to {args.out}")
    return 0


def _tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["train"])
    p.add_argument("src", help="run config (.yaml), text shard folder, or .txt/.jsonl file or folder")
    p.add_argument("--vocab-size", type=int, required=True, help="ids in all, special tokens included")
    p.add_argument("--out", required=True, help="folder to write tokenizer.json into")


@command(
    "tokenizer", "train a byte-level BPE tokenizer (train text of a config or shard folder, or text/JSONL)", _tokenizer_arguments,
    examples=[
        "mmeff tokenizer train data/python_docs --vocab-size 4096 --out data/bpe",
        "mmeff shards --source python-docs -o tokenizer=data/bpe data/python_docs_bpe   # then shards with it",
    ],
)
def tokenizer(args: argparse.Namespace) -> int:
    from mmeff.data.text import training_texts
    from mmeff.encoders.text import train_bpe

    trained = train_bpe(training_texts(args.src), args.vocab_size, show_progress=True)
    print(f"{trained.vocab_size}-token BPE tokenizer written to {trained.save(args.out)}")
    return 0


def _stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config with encoder.name: audio")


@command(
    "audio-stats", "print the log-mel mean/std of a config's train shards (encoder.norm_mean/norm_std)", _stats_arguments,
    examples=["mmeff audio-stats configs/audio/spoken_digits.yaml"],
)
def audio_stats(args: argparse.Namespace) -> int:
    from mmeff import config
    from mmeff.data.audio_stats import compute_stats

    mean, std = compute_stats(config.load(args.config))
    print(f"norm_mean: {mean:.6g}\nnorm_std: {std:.6g}")
    return 0


def _sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="shard folder (mmeff shards OUT)")
    p.add_argument("--split", default="test", help="split to read (default %(default)s)")
    p.add_argument("--index", type=int, default=0, help="which sample of the split, from 0 (default %(default)s)")
    p.add_argument("--out", default=".", help="folder to write the sample's files into (default: here)")


@command(
    "sample", "write one sample of a shard folder as files (an input for generate --image/--audio)", _sample_arguments,
    examples=[
        "mmeff sample data/digit_scenes --index 3      # writes ./<key>.png and its caption <key>.txt",
        "mmeff generate runs/digit_scenes/export --image <key>.png",
    ],
)
def sample(args: argparse.Namespace) -> int:
    import tarfile
    from pathlib import Path

    from mmeff.data.shards import read_index

    root, out = Path(args.root), Path(args.out)
    index = read_index(root)
    if args.split not in index or args.split == "meta":
        raise ConfigError(f"{root}: no split {args.split!r}; it has {', '.join(k for k in index if k != 'meta') or 'no shards'}")
    keys: list[str] = []  # the samples met so far; a sample's files are adjacent in its shard
    for shard in index[args.split]["shards"]:
        with tarfile.open(root / shard) as tar:
            for member in tar:
                key, _, ext = Path(member.name).name.partition(".")
                if not keys or keys[-1] != key:
                    keys.append(key)
                if len(keys) - 1 > args.index:
                    return 0
                if len(keys) - 1 == args.index and member.isreg():
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"{key}.{ext}").write_bytes(tar.extractfile(member).read())
                    print(out / f"{key}.{ext}")
    if len(keys) <= args.index:
        raise ConfigError(f"{root}: split {args.split!r} holds {len(keys)} samples; --index {args.index} is past its end")
    return 0
