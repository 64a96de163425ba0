"""Request and response bodies of the OpenAI-compatible routes (/v1/completions, /v1/chat/completions, /v1/models).

They mirror the OpenAI schema so the official clients work unchanged. `model` is a registered
base model (`smollm2-135m`) or `<target>:<skill>`: the skill's adapter on that target model.
Requests ignore fields this server does not use (`user`, `logit_bias`, ...) instead of
refusing them, since clients send them by default; the ones that would change the answer and
are not served (`tools`) are refused with a clear message. `logprobs`, `echo` (with `max_tokens`
0 to score a text), `n` and prompts given as token ids or lists are served, so evaluation
harnesses (lm-evaluation-harness `local-completions`) run against the service.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.schemas import SaeApplied, SaeSpec, Text

MAX_N = 16
"""Most completions per prompt (`n`)."""
MAX_PROMPTS = 64
"""Most prompts in one /v1/completions request."""
MAX_LOGPROBS = 20
"""Most alternatives per token (resa_engine.sampling.MAX_LOGPROBS)."""

# ---------------------------------------------------------------- errors


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


# ---------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="A base model name, or `<target>:<skill>` for a skill's adapter on it.")
    max_tokens: int | None = Field(default=None, ge=0, description="Most tokens to generate (default 256; 0 only with `echo`).")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0: greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=MAX_N, description="Completions per prompt (sample i uses seed + i).")
    sae: SaeSpec | None = Field(default=None, description="A skill's SAE attached to the request: steering edits or splice mode (send via `extra_body`).")
    compare: bool = Field(
        default=False, description="With `sae`: choice 0 is steered, choice 1 the same request unsteered (same batch, same seed)."
    )

    @model_validator(mode="after")
    def _compare_needs_sae(self):
        if self.compare and self.sae is None:
            raise ValueError("`compare` needs an `sae` block to compare against")
        if self.compare and self.n != 1:
            raise ValueError("`compare` returns one completion with the SAE and one without: it needs n = 1")
        return self

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Request):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="The text to continue: a string, a list of strings, token ids, or a list of token-id lists."
    )
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="Logprobs of each token and of its N likeliest alternatives.")
    echo: bool = Field(default=False, description="Return the prompt before the completion (with `logprobs`, the prompt's logprobs too).")

    @model_validator(mode="after")
    def _prompts(self) -> "CompletionRequest":
        prompts = self.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompt: give a non-empty string or token-id list (or a non-empty list of them)")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"prompt: at most {MAX_PROMPTS} prompts per request")
        if any(isinstance(p, list) and any(t < 0 for t in p) for p in prompts):
            raise ValueError("prompt: token ids are non-negative")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 only makes sense with echo (scoring the prompt)")
        if self.compare and len(prompts) != 1:
            raise ValueError("`compare` takes one prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list of strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)


class ChatCompletionMessageParam(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(_Request):
    messages: list[ChatCompletionMessageParam] = Field(min_length=1, description="Rendered with the model's chat template.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Alias of max_tokens (newer clients).")
    logprobs: bool | None = Field(default=None, description="Logprobs of each generated token.")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="With `logprobs`: the N likeliest alternatives too.")
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be at least 1")
        if self.tools:
            raise ValueError("tools are not supported")
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


# ---------------------------------------------------------------- responses


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions format: one entry per token of the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class _Served(BaseModel):
    """What every completion response carries: its id, time, model, and how the skill was served."""

    id: str
    created: int
    model: str
    cross_model: bool = Field(default=False, description="The skill's adapter was built on another, compatible model.")
    adapter_target: str | None = Field(default=None, description="The model the served adapter was built on.")
    sae: SaeApplied | None = Field(default=None, description="The steering applied (choice 0), when the request had `sae`.")


class CompletionResponse(_Served):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Served):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChatLogprobs | None = None


class _Chunk(BaseModel):
    id: str
    created: int
    model: str
    usage: CompletionUsage | None = None


class ChatCompletionChunk(_Chunk):
    """One SSE event of a streamed chat completion; the last one carries `finish_reason` and `usage`."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(_Chunk):
    """One SSE event of a streamed text completion (`object: text_completion`, as OpenAI sends)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


# ---------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str = Field(description="`<name>` for a base model, `<target>:<skill>` for an adapter.")
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "resa"
    parent: str | None = Field(default=None, description="The base model an adapter runs on.")
    root: str | None = None


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


ModelList = OpenAIModelList
"""The name in the OpenAI schema (the class is named apart from the service's own `ModelList`)."""
