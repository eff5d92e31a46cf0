"""The OpenAI API as calm-edge serves it: request bodies, the chat template, response objects.

Requests are validated at the boundary by pydantic, strictly (a string is not a number, a
number is not a boolean); any problem is a 400 with OpenAI's error body, naming the field in
`param`. Fields this server does not implement are refused when they would change the result
(`n` other than 1, `echo`), and ignored otherwise (`top_p`, `user`, penalties: CALM has no
logits to apply them to; `logprobs` likewise).

CALM's own settings travel in an `extra` object, which the official clients send with
`extra_body={"extra": {...}}`: `method` ("batch" or "exact"), `candidates` (the batch
approximation's N) and `ignore_eos` (vLLM's name: run to `max_tokens` past the end-of-text token). `temperature` must be 1/n for a whole number n, as everywhere in calm-edge.

The chat template. The released CALM models (and calm-edge's own) are base models, trained on
plain text with no chat turns; `/v1/chat/completions` therefore lays the conversation out as
plain text and lets the model continue it:

    System: {system message}

    User: {user message}
    Assistant: {assistant message}
    User: {user message}
    Assistant:

and stops before the model starts a new "\\nUser:" turn. A base model follows this only as well
as its training text taught it; the endpoint is there so that chat clients can talk to the server.
"""
import secrets
import time
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.sampling import METHODS, temperature_exponent

MAX_CANDIDATES = 1024  # the batch approximation's N: beyond it a step's energy-head call alone takes seconds
MAX_STOP_SEQUENCES = 4  # as OpenAI
SEED_LIMIT = 2**64  # seeds are 0 .. 2**64 - 1, the randomness contract's range
CHAT_STOP = "\nUser:"


class Extra(BaseModel):
    """CALM's sampler settings (`extra` in a request body)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    method: Literal[METHODS] = "batch"
    candidates: int = Field(16, ge=1, le=MAX_CANDIDATES)
    ignore_eos: bool = False  # as vLLM's: generate max_tokens whatever the model says (benchmarks want that)


class _Common(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    model: Optional[str] = None  # one model per server: any name is answered by it
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = 1.0
    seed: Optional[int] = Field(None, ge=0, lt=SEED_LIMIT)
    stop: Union[str, list[str], None] = Field(None, validate_default=True)  # a list once validated
    stream: bool = False
    n: Literal[1] = 1
    extra: Extra = Extra()

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):
        try:
            temperature_exponent(value)
        except CalmEdgeError as e:
            raise ValueError(str(e)) from None
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return [s for s in stops if s]


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    echo: Literal[False] = False


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


def chat_prompt(messages):
    """The plain-text layout of a conversation (see the module docstring), ending with "Assistant:"."""
    parts = []
    for message in messages:
        if message.role == "system":
            parts.append(f"System: {message.content}\n\n")
        else:
            parts.append(f"{message.role.capitalize()}: {message.content}\n")
    return "".join(parts) + "Assistant:"


def error_body(message, param=None, kind="invalid_request_error", code=None):
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_errors_body(errors):
    """One error body from pydantic's (or FastAPI's) list of validation errors: the first names the field."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    if first.get("type") in ("json_invalid", "model_attributes_type") or param is None:
        message = "the request body is not a JSON object; send Content-Type: application/json with a JSON object"
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'invalid JSON')})"
        return error_body(message)
    message = message.removeprefix("Value error, ")
    return error_body(f"{param}: {message}", param=param)


def new_id(prefix):
    return f"{prefix}-{secrets.token_hex(12)}"


def finish_reason(stop_reason):
    """OpenAI's finish_reason for a runtime stop reason."""
    return "length" if stop_reason in ("max_new_tokens", "context") else "stop"


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Responder:
    """The response objects of one request, completion or chat, whole or in streamed chunks."""

    def __init__(self, chat, model_name, seed):
        self.chat, self.model_name, self.seed = chat, model_name, seed
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.first_chunk = True

    def _envelope(self, obj, choices, usage_block=None):
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model_name, "choices": choices,
                "system_fingerprint": f"calm-edge-seed-{self.seed}"}
        if usage_block is not None:
            body["usage"] = usage_block
        return body

    def whole(self, text, reason, prompt_tokens, completion_tokens):
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
            return self._envelope("chat.completion", [choice], usage(prompt_tokens, completion_tokens))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return self._envelope("text_completion", [choice], usage(prompt_tokens, completion_tokens))

    def chunk(self, text, reason=None):
        if self.chat:
            delta = {"content": text}
            if self.first_chunk:
                delta["role"] = "assistant"
            self.first_chunk = False
            return self._envelope("chat.completion.chunk",
                                  [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}])
        return self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}])

    def usage_chunk(self, prompt_tokens, completion_tokens):
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage(prompt_tokens, completion_tokens))
