"""Text generation from any LM checkpoint: prefill the prompt, then decode token by token through each mixer's cache.

A model generates if it has `embed(ids) -> [B, T, D]`, `hidden(x, cache, layout) -> [B, T, D]`, `head(h) -> logits`
and `new_cache()` (mmeff.tasks.lm.LanguageModel; a captioner adds its image tokens as `prefix_embeds`, whose length
the prefill's layout names as its prefix).
Prompts of different lengths are grouped by length: each group is prefilled and decoded as one batch with its
own cache, so every sequence sees exactly the state it would see alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mmeff.blocks import Layout
from mmeff.config import ConfigError
from mmeff.encoders.text import Tokenizer

TextCallback = Callable[[int, str], None]  # (prompt index, newly final text)
USER, ASSISTANT = "User:", "Assistant:"  # `mmeff chat` turns


@dataclass
class Sampling:
    """How each next token is chosen; `greedy` (or temperature 0) takes the most likely one."""

    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (CTRL's penalty)
    stop: list[str] = field(default_factory=list)  # stop when the generated text contains one; it is trimmed
    seed: int | None = None  # a fixed seed makes sampling reproducible

    def check(self) -> None:
        """Raise ConfigError for out-of-range settings."""
        problems = [
            (self.max_new_tokens < 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (self.temperature < 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k is not None and self.top_k < 1, f"top_k must be >= 1, got {self.top_k}"),
            (self.top_p is not None and not 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty <= 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (any(not s for s in self.stop), "stop strings must not be empty"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)


@dataclass
class Generation:
    """Per prompt the new ids (no <eos>; up to the one completing a stop string) and text (cut before it); timings."""

    tokens: list[list[int]]
    texts: list[str]
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float

    def speed(self) -> str:
        """One line with prefill and decode throughput."""
        return (
            f"prefill {self.prefill_tokens} tokens in {self.prefill_seconds:.3f}s "
            f"({_rate(self.prefill_tokens, self.prefill_seconds):.1f} tokens/s), "
            f"decode {self.decode_tokens} tokens in {self.decode_seconds:.3f}s "
            f"({_rate(self.decode_tokens, self.decode_seconds):.1f} tokens/s)"
        )


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("inf")


def next_tokens(
    logits: torch.Tensor, context: torch.Tensor, s: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Logits [B, V] and the ids so far [B, L] -> the chosen ids [B]."""
    logits = logits.float()
    if s.repetition_penalty != 1.0:
        seen, p = logits.gather(1, context), s.repetition_penalty
        logits = logits.scatter(1, context, torch.where(seen > 0, seen / p, seen * p))
    if s.greedy or s.temperature == 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k is not None:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # Keep the most likely tokens until their mass reaches top_p (always the first one).
        ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= s.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, ordered)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


class _Output:
    """One prompt's generated ids and text: stop-string and <eos> handling, and streaming of final text."""

    def __init__(self, index: int, tokenizer: Tokenizer | None, stop: list[str], on_text: TextCallback | None) -> None:
        self.index, self.tokenizer, self.stop, self.on_text = index, tokenizer, stop, on_text
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.done = False

    def add(self, token: int, eos_id: int | None) -> None:
        """Record a generated token (an <eos> ends the sequence)."""
        if token == eos_id:
            self.finish()
            return
        self.ids.append(token)
        if self.tokenizer is None:
            return
        self.text = self.tokenizer.decode(self.ids)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish()
        else:
            self._emit(self._stable_end())

    def finish(self) -> None:
        """End the sequence and stream what is left of its text."""
        self.done = True
        self._emit(len(self.text))

    def _stable_end(self) -> int:
        # Text that may still change is held back: a trailing U+FFFD can be an incomplete UTF-8
        # sequence, and a tail that starts a stop string may become one.
        text = self.text.rstrip("\ufffd")
        held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return len(text) - held

    def _emit(self, end: int) -> None:
        if self.on_text is not None and end > self.emitted:
            self.on_text(self.index, self.text[self.emitted : end])
        self.emitted = max(self.emitted, end)


class _Group:
    """Prompts of one length, decoded as a batch with one cache (or recomputed from scratch without)."""

    def __init__(
        self, members: list[int], context: torch.Tensor, prefix: torch.Tensor | None, use_cache: bool, model: nn.Module
    ) -> None:
        self.members, self.context, self.prefix = members, context, prefix
        self.cache = model.new_cache() if use_cache else None
        self.logits: torch.Tensor | None = None

    def forward(self, model: nn.Module, new: torch.Tensor | None = None) -> None:
        """Set `logits` [G, V] of the next position: prefill (new=None), or one step with the ids `new` [G]."""
        if new is not None:
            self.context = torch.cat([self.context, new[:, None]], dim=1)
        layout = None
        if self.cache is not None and new is not None:
            x = model.embed(new[:, None])
        else:
            x = model.embed(self.context)
            if self.prefix is not None:
                x = torch.cat([self.prefix.to(x.dtype), x], dim=1)
                layout = Layout(prefix=self.prefix.shape[1])
        self.logits = model.head(model.hidden(x, cache=self.cache, layout=layout)[:, -1])


def _sync(device: torch.device) -> None:
    # CUDA runs asynchronously: wait for the queued work so that the timings are the work's.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling | None = None,
    tokenizer: Tokenizer | None = None,
    eos_id: int | None = None,
    prefix_embeds: torch.Tensor | None = None,
    on_text: TextCallback | None = None,
    use_cache: bool = True,
) -> Generation:
    """Continue each prompt (token ids) with up to `sampling.max_new_tokens` tokens.

    `tokenizer` decodes texts and finds stop strings; `eos_id` defaults to the tokenizer's.
    `prefix_embeds` [B, P, D] go before each prompt's token embeddings (e.g. image tokens).
    `on_text(i, piece)` streams each prompt's text as it becomes final. `use_cache=False`
    recomputes the whole sequence at every step (the reference the cached path must match).
    """
    s = sampling or Sampling()
    s.check()
    if s.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the generated text")
    if not prompts:
        raise ValueError("no prompts given")
    if prefix_embeds is not None and prefix_embeds.shape[0] != len(prompts):
        raise ValueError(f"prefix_embeds has {prefix_embeds.shape[0]} rows for {len(prompts)} prompts")
    if prefix_embeds is None and any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: give at least one token (e.g. <eos>, which starts a document)")
    eos_id = eos_id if eos_id is not None or tokenizer is None else tokenizer.eos_id
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(s.seed) if s.seed is not None else None
    outputs = [_Output(i, tokenizer, s.stop, on_text) for i in range(len(prompts))]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)

    training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        groups = []
        for length, members in by_length.items():
            context = torch.tensor([list(prompts[i]) for i in members], dtype=torch.long, device=device)
            context = context.view(len(members), length)  # also [G, 0] for empty prompts after a prefix
            prefix = prefix_embeds[members].to(device) if prefix_embeds is not None else None
            group = _Group(members, context, prefix, use_cache, model)
            group.forward(model)
            groups.append(group)
        _sync(device)
        prefill_seconds = time.perf_counter() - start

        start, generated = time.perf_counter(), 0
        for step in range(s.max_new_tokens):
            for group in groups:
                new = next_tokens(group.logits, group.context, s, generator)
                for i, token in zip(group.members, new.tolist()):
                    if not outputs[i].done:
                        outputs[i].add(token, eos_id)
                        generated += 1
                if step + 1 < s.max_new_tokens and not all(outputs[i].done for i in group.members):
                    group.forward(model, new)
            groups = [g for g in groups if not all(outputs[i].done for i in g.members)]
        for out in outputs:
            out.finish()
        _sync(device)
        decode_seconds = time.perf_counter() - start
    finally:
        model.train(training)
    return Generation(
        tokens=[o.ids for o in outputs],
        texts=[o.text for o in outputs],
        prefill_tokens=sum(len(p) for p in prompts) + (prefix_embeds.shape[:2].numel() if prefix_embeds is not None else 0),
        prefill_seconds=prefill_seconds,
        decode_tokens=generated,
        decode_seconds=decode_seconds,
    )


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of `text`; an empty prompt is <eos>, the token before every packed training document."""
    bad = next((i for i, c in enumerate(text) if "\udc80" <= c <= "\udcff"), None)  # bytes Python could not decode
    if bad is not None:
        raise ConfigError(f"the prompt is not UTF-8 text: byte 0x{ord(text[bad]) - 0xDC00:02x} at character {bad}")
    return tokenizer.encode(text) or [tokenizer.eos_id]
