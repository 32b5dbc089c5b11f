"""Continuous batching: one decoding loop in one thread; requests join and leave the running batch between steps.

A request is prefilled alone (its prompt through the model's ordinary forward, filling its own
caches), then joins the running batch; every step samples one token per running sequence and feeds
them all through `mmeff.serve.rows.step`. A sequence leaves at <eos>, a stop string, its token
budget or when its client goes away (`Handle.cancel`), and frees its slot for a waiting request.
The sampling of each sequence is `mmeff.generate`'s (`next_tokens`, and its output handling for
<eos>, stop strings and streamed text), so a request gets the text `mmeff generate` would give it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mmeff.blocks.cache import Cache
from mmeff.encoders.text import Tokenizer
from mmeff.generate import Sampling, _Output, next_tokens
from mmeff.serve.rows import step

log = logging.getLogger("mmeff")


@dataclass
class Result:
    """What one request produced: the new ids and text, why it ended, and an error message when it failed."""

    ids: list[int]
    text: str
    finish_reason: str  # "stop" (<eos> or a stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class _Sequence:
    prompt: list[int]
    sampling: Sampling
    on_text: Callable[[str], None]
    on_done: Callable[[Result], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    caches: list[Cache] = field(default_factory=list)
    context: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    generator: torch.Generator | None = None
    output: _Output | None = None
    produced: int = 0


class Handle:
    """A submitted request: `cancel()` frees its slot (a client that went away)."""

    def __init__(self, seq: _Sequence) -> None:
        self._seq = seq

    def cancel(self) -> None:
        """Stop generating for this request before the next step; its `on_done` gets finish_reason 'cancelled'."""
        self._seq.cancelled.set()


def _plain_greedy(s: Sampling) -> bool:
    return (s.greedy or s.temperature == 0) and s.repetition_penalty == 1.0


def _safe(callback: Callable, *args: object) -> None:
    # A callback that fails (e.g. the client's event loop closed) must not stop the loop for everyone else.
    try:
        callback(*args)
    except Exception:  # noqa: BLE001
        log.debug("serve: a request callback failed", exc_info=True)


class Engine:
    """The decoding loop of one LM (`embed`, `hidden`, `head`, `new_cache`, `backbone`); at most `max_batch` running."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch: int = 32, prefill_tokens: int = 512) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        self.prefill_tokens = prefill_tokens  # prompt tokens prefilled between two steps of a running batch (>= 1 prompt)
        self.device = next(model.parameters()).device
        self._waiting: queue.Queue[_Sequence] = queue.Queue()
        self._running: list[_Sequence] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"steps": 0, "largest_batch": 0, "joined_while_running": 0}

    @property
    def running(self) -> int:
        """Sequences in the decoding batch now."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self._waiting.qsize()

    def start(self) -> Engine:
        """Start the decoding thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="mmeff-serve-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the decoding thread; unfinished requests end with finish_reason 'cancelled'."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for seq in self._running:
            self._finish(seq, "cancelled")
        self._running = []
        while not self._waiting.empty():
            self._finish(self._waiting.get_nowait(), "cancelled")

    def submit(
        self,
        prompt: Sequence[int],
        sampling: Sampling,
        on_text: Callable[[str], None],
        on_done: Callable[[Result], None],
    ) -> Handle:
        """Queue a prompt (token ids); `on_text(piece)` streams final text, `on_done(result)` ends it (engine thread)."""
        if not prompt:
            raise ValueError("empty prompt")
        sampling.check()
        seq = _Sequence(list(prompt), sampling, on_text, on_done)
        self._waiting.put(seq)
        return Handle(seq)

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                self._admit()
                if self._running:
                    self._step()

    def _admit(self) -> None:
        # A burst of requests is prefilled a few prompts per step, so that the running rows keep decoding meanwhile.
        budget = self.prefill_tokens
        while len(self._running) < self.max_batch and budget > 0:
            try:
                seq = self._waiting.get(timeout=0.05) if not self._running else self._waiting.get_nowait()
            except queue.Empty:
                return
            if seq.cancelled.is_set():
                self._finish(seq, "cancelled")
                continue
            try:
                self._prefill(seq)
            except Exception as e:  # noqa: BLE001 - one bad request must not take the server down
                log.exception("serve: prefill failed")
                self._finish(seq, "error", f"{type(e).__name__}: {e}")
                continue
            if self._running:
                self.stats["joined_while_running"] += 1
            budget -= len(seq.prompt)
            self._running.append(seq)

    def _prefill(self, seq: _Sequence) -> None:
        s, model = seq.sampling, self.model
        seq.output = _Output(0, self.tokenizer, s.stop, lambda _, piece: _safe(seq.on_text, piece))
        if s.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(s.seed)
        seq.context = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
        seq.caches = model.new_cache()
        seq.logits = model.head(model.hidden(model.embed(seq.context), cache=seq.caches)[:, -1])

    def _sample(self, rows: list[_Sequence]) -> list[tuple[_Sequence, torch.Tensor]]:
        """Each row's next token ([1], on the device); a row whose sampling fails is finished with the error."""
        sampled: dict[int, torch.Tensor] = {}
        plain = [seq for seq in rows if _plain_greedy(seq.sampling)]
        if len(plain) > 1:  # the argmax of every greedy row at once, not a few kernels per row
            with contextlib.suppress(Exception):  # should it fail, each row samples alone below and fails alone
                sampled = dict(zip(map(id, plain), next_tokens(torch.cat([seq.logits for seq in plain]), None, plain[0].sampling).split(1)))
        out = []
        for seq in rows:
            try:
                token = sampled.get(id(seq))
                out.append((seq, token if token is not None else next_tokens(seq.logits, seq.context, seq.sampling, seq.generator)))
            except Exception as e:  # noqa: BLE001
                self._finish(seq, "error", f"{type(e).__name__}: {e}")
        return out

    def _step(self) -> None:
        live = []
        for seq in self._running:
            if seq.cancelled.is_set():
                self._finish(seq, "cancelled")
            else:
                live.append(seq)
        sampled = self._sample(live)
        # Every row's token read back in one copy: one wait for the device a step, not one per row.
        values = torch.cat([token for _, token in sampled]).tolist() if sampled else []
        keep: list[tuple[_Sequence, torch.Tensor]] = []
        for (seq, token), value in zip(sampled, values):
            seq.produced += 1
            seq.output.add(value, self.tokenizer.eos_id)
            if seq.output.done:
                self._finish(seq, "stop")
            elif seq.produced >= seq.sampling.max_new_tokens:
                self._finish(seq, "length")
            else:
                if seq.sampling.repetition_penalty != 1.0:  # the ids so far: only the penalty reads them
                    seq.context = torch.cat([seq.context, token[:, None]], dim=1)
                keep.append((seq, token))
        self._running = [seq for seq, _ in keep]
        if not keep:
            return
        self.stats["steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(keep))
        try:
            logits = step(self.model, torch.cat([token for _, token in keep])[:, None], [seq.caches for seq, _ in keep])
        except Exception as e:  # noqa: BLE001
            log.exception("serve: decoding step failed")
            for seq, _ in keep:
                self._finish(seq, "error", f"{type(e).__name__}: {e}")
            self._running = []
            return
        for i, (seq, _) in enumerate(keep):
            seq.logits = logits[i : i + 1]

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        if seq.output is not None:
            seq.output.finish()
        out = seq.output
        result = Result(
            ids=out.ids if out else [],
            text=out.text if out else "",
            finish_reason=reason,
            prompt_tokens=len(seq.prompt),
            completion_tokens=seq.produced,
            error=error,
        )
        seq.caches, seq.logits = [], None
        _safe(seq.on_done, result)
