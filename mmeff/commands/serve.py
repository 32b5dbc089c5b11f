"""`mmeff serve CKPT`: an OpenAI-style HTTP API over an LM checkpoint (mmeff.serve)."""

from __future__ import annotations

import argparse

from mmeff.commands import command


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint folder of a text LM")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--context", type=int, help="longest prompt + reply in tokens (default: the trained encoder.seq_len)")
    p.add_argument("--name", help="model name the API reports (default: the checkpoint folder's)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default %(default)s)")


@command(
    "serve", "serve an LM checkpoint over HTTP (OpenAI-style /v1 completions and chat) until interrupted", _arguments,
    examples=["mmeff serve runs/python_docs_gla/export --port 8000"],
)
def serve(args: argparse.Namespace) -> int:
    from mmeff.serve.app import run_serve

    return run_serve(args)
