"""The subcommands of `mmeff`: each registers `def run(args) -> int` as `@COMMANDS.register(NAME, arguments=...)`.

A command module imports only the standard library and light mmeff modules at its top (torch, Lightning and the
models inside `run`), so that `mmeff --help` and a config error start without torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from mmeff.registry import Registry

Handler = Callable[[argparse.Namespace], int]

COMMANDS: Registry[Handler] = Registry(
    "command",
    {
        **dict.fromkeys(("fit", "validate", "test"), "mmeff.commands.train"),
        **dict.fromkeys(("shards", "sample", "tokenizer", "audio-stats"), "mmeff.commands.data"),
        **dict.fromkeys(("blocks", "models"), "mmeff.commands.listing"),
        **dict.fromkeys(("generate", "chat"), "mmeff.commands.generate"),
        "convert": "mmeff.commands.convert",
        "export": "mmeff.commands.export",
        "plot": "mmeff.commands.plot",
        "serve": "mmeff.commands.serve",
    },
)


def command(
    name: str,
    summary: str,
    arguments: Callable[[argparse.ArgumentParser], None],
    examples: Sequence[str] = (),
    overrides: bool = False,
    notes: str | Callable[[], str] = "",
) -> Callable[[Handler], Handler]:
    """Register a subcommand: its one-line `summary`, a function adding its `arguments`, the `examples` its help
    shows, whether it takes config overrides (`--key.path=value`, in `args.overrides`), and further `notes` for
    its help (a function when they are costly to make: it runs only when the help is shown)."""
    return COMMANDS.register(name, summary=summary, arguments=arguments, examples=tuple(examples), overrides=overrides, notes=notes)
