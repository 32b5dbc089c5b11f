"""Serving an LM over HTTP: the OpenAI-compatible app (`app`), continuous batching (`engine`, `rows`)."""

from mmeff.serve.engine import Engine, Result

__all__ = ["Engine", "Result"]
