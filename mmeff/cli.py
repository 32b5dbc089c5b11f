"""The `mmeff` command line: train, evaluate, write shards, list blocks and presets, generate, chat, plot."""

from __future__ import annotations

import argparse
import logging
import sys

from mmeff import __version__
from mmeff.commands import COMMANDS
from mmeff.config import ConfigError
from mmeff.errors import MmeffError

EXAMPLES = """examples:
  mmeff shards --source digits data/digits      # write a bundled data set as shards
  mmeff fit configs/vision/digits.yaml          # train; the export lands in runs/digits/export
  mmeff test configs/vision/digits.yaml         # evaluate the export on the test split
  mmeff plot runs/digits                        # loss / accuracy / lr curves as a PNG
  mmeff blocks                                  # the token mixers a backbone.pattern can name
  mmeff COMMAND --help                          # a command's options and examples"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help ends with notes and examples, the notes made only when help is shown."""

    def __init__(self, *args: object, notes: object = "", examples: tuple[str, ...] = (), **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.notes, self.examples = notes, examples

    def format_help(self) -> str:
        notes = self.notes() if callable(self.notes) else self.notes
        parts = [notes] if notes else []
        parts += ["examples:\n" + "\n".join(f"  {e}" for e in self.examples)] if self.examples else []
        self.epilog = "\n\n".join(parts) or self.epilog
        return super().format_help()


def parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (imports the command modules, which import no torch)."""
    p = _Parser(prog="mmeff", description=__doc__, epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"mmeff {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for entry in COMMANDS.entries():
        s = sub.add_parser(entry.name, help=entry.summary, description=entry.summary, notes=entry.meta["notes"], examples=entry.meta["examples"])
        entry.meta["arguments"](s)
    return p


def _overrides(rest: list[str]) -> list[str]:
    bad = [a for a in rest if not a.startswith("--") or "=" not in a]
    if bad:
        raise ConfigError(f"unrecognised arguments {bad}; config overrides look like --key.path=value (see --help)")
    return rest


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmeff` console script."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("mmeff")  # Lightning configures its own loggers; only ours get this handler
    if not root.handlers:
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    p = parser()
    args, rest = p.parse_known_args(argv)
    entry = COMMANDS.entry(args.command)
    if rest and not entry.meta["overrides"]:
        p.error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        if entry.meta["overrides"]:
            args.overrides = _overrides(rest)
        return entry.obj(args)
    except (MmeffError, FileNotFoundError) as e:
        print(f"mmeff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nmmeff {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """Destroy the default process group a distributed command leaves behind (Lightning's strategies keep it for
    reuse). Left to interpreter exit, a rank of tests/trainer/test_distributed.py aborted after its work was done
    ("terminate called without an active exception", SIGABRT), in one of four CI runs of a session."""
    dist = sys.modules.get("torch.distributed")  # never imported: no group to leave, and no torch import for --help
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
