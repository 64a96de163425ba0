"""Request and response bodies of the OpenAI-compatible routes (/v1/completions, /v1/chat/completions, /v1/models).

They mirror the OpenAI schema so the official clients work unchanged. `model` is a registered
base model (`smollm2-135m`) or `<target>:<skill>`: the skill's adapter on that target model.
Requests ignore fields this server does not use (`user`, `logit_bias`, ...) instead of
refusing them, since clients send them by default; the ones that would change the answer
(`n` > 1, `logprobs`, `tools`) are refused with a clear message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.schemas import SteeringApplied, SteerSpec

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
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate (default 256).")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0: greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="Only 1 choice per request is served.")
    sae: SteerSpec | None = Field(default=None, description="Steering with a skill's SAE latent edits (send via `extra_body`).")
    compare: bool = Field(
        default=False, description="With `sae`: choice 0 is steered, choice 1 the same request unsteered (same batch, same seed)."
    )

    @model_validator(mode="after")
    def _compare_needs_sae(self):
        if self.compare and self.sae is None:
            raise ValueError("`compare` needs an `sae` block to compare against")
        return self

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Request):
    prompt: str = Field(min_length=1, description="The text to continue (a single string).")
    logprobs: int | None = None
    echo: bool = False

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.logprobs is not None:
            raise ValueError("logprobs are not supported")
        if self.echo:
            raise ValueError("echo is not supported")
        return self


class ChatCompletionMessageParam(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Request):
    messages: list[ChatCompletionMessageParam] = Field(min_length=1, description="Rendered with the model's chat template.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Alias of max_tokens (newer clients).")
    logprobs: bool | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> "ChatCompletionRequest":
        if self.logprobs:
            raise ValueError("logprobs are not supported")
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


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    cross_model: bool = Field(default=False, description="The skill's adapter was built on another, compatible model.")
    adapter_target: str | None = Field(default=None, description="The model the served adapter was built on.")
    sae: SteeringApplied | None = Field(default=None, description="The steering applied (choice 0), when the request had `sae`.")


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage
    cross_model: bool = False
    adapter_target: str | None = None
    sae: SteeringApplied | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion; the last one carries `finish_reason` and `usage`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None


class CompletionChunk(BaseModel):
    """One SSE event of a streamed text completion (`object: text_completion`, as OpenAI sends)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


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
