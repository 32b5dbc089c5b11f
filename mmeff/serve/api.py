"""The OpenAI request bodies the server takes, and their checks: every error names the field at fault."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmeff.generate import ASSISTANT, USER, Sampling


class APIError(Exception):
    """A request the server refuses: HTTP `status`, and the body field (`param`) it is about."""

    def __init__(self, status: int, message: str, param: str | None, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        """The OpenAI error object."""
        return {"error": {"message": self.message, "type": self.code, "param": self.param, "code": None}}


class _Body(BaseModel):
    # Unknown fields are errors (a misspelt `max_token` must not be silently ignored); no type coercion.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: Literal[1] = 1
    user: str | None = None

    def sampling(self, max_new_tokens: int, extra_stop: list[str] = ()) -> Sampling:
        """The `mmeff.generate.Sampling` of this request."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", "stop")
        return Sampling(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,  # 0: greedy
            top_k=self.top_k,
            top_p=self.top_p if self.top_p < 1 else None,
            repetition_penalty=self.repetition_penalty,
            stop=stop + list(extra_stop),
            seed=self.seed,
        )


class CompletionRequest(_Body):
    """POST /v1/completions: continue `prompt` (one string)."""

    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions

    def text(self) -> str:
        """The one prompt of this request."""
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise APIError(400, f"give one prompt per request, got a list of {len(self.prompt)}", "prompt")
            return self.prompt[0]
        return self.prompt


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Body):
    """POST /v1/chat/completions: the reply to `messages`, in `mmeff chat`'s 'User: ... / Assistant: ...' format."""

    messages: list[Message]

    def text(self) -> str:
        """The conversation as the model's prompt, ending where the assistant's reply starts."""
        if not self.messages:
            raise APIError(400, "messages is empty; give at least one message", "messages")
        turns = {"system": "{}\n", "user": f"{USER} {{}}\n", "assistant": f"{ASSISTANT} {{}}\n"}
        return "".join(turns[m.role].format(m.content.strip()) for m in self.messages) + ASSISTANT


def parse(raw: bytes, kind: type[_Body]) -> _Body:
    """The request body `raw` as `kind`, or an APIError naming what is wrong (400: bad JSON or field, not UTF-8)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})", "body") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not JSON: {e}", "body") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", "body")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        message = "unknown parameter" if first["type"] == "extra_forbidden" else first["msg"]
        raise APIError(400, f"{field}: {message}", field) from None


def check_lengths(prompt_tokens: int, max_tokens: int | None, context: int, field: str) -> int:
    """The number of tokens to generate; an APIError for an empty or too long prompt or a bad max_tokens."""
    if prompt_tokens == 0:
        raise APIError(400, f"{field} is empty; give at least one character", field)
    if prompt_tokens >= context:
        raise APIError(400, f"{field} is {prompt_tokens} tokens; the model's context is {context}", field, "context_length_exceeded")
    room = context - prompt_tokens
    if max_tokens is None:
        return room
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    if max_tokens > room:
        raise APIError(
            400,
            f"max_tokens {max_tokens} + {prompt_tokens} prompt tokens is past the model's context of {context}",
            "max_tokens",
            "context_length_exceeded",
        )
    return max_tokens
