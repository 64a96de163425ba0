"""OpenAI-compatible routes, served through the generation engine (app/services/generation.py): /v1/completions,
/v1/chat/completions (JSON or SSE streaming) and /v1/models.

`model` names a base model or `<target>:<skill>` (the skill's adapter on that target; a
compatible adapter built on another model is served when the target has none, and the
response says `cross_model`). Errors carry OpenAI's `param` and `code` besides the service's
`type` and `message`. A client that goes away cancels its request, freeing its batch slot.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.api.deps import GenerateAccess, GenerationDep, StoreDep
from app.api.errors import ApiError, Invalid
from app.api.openai_protocol import (
    ChatChunkChoice,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatLogprobs,
    ChatTokenLogprob,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    OpenAIModelList,
    OpenAIErrorResponse,
    CompletionUsage,
)
from app.services.generation import GenerationCall, Queued, as_engine_error

DEFAULT_MAX_TOKENS = 256

_ERRORS = {
    code: {"model": OpenAIErrorResponse, "description": text}
    for code, text in {
        401: "Missing or invalid API key.",
        403: "The key lacks the `generate` permission.",
        404: "Unknown model, target or skill.",
        409: "No adapter of the skill fits the model, or the stored adapter is corrupt.",
        413: "Prompt over the server's token limit.",
        422: "Invalid request.",
        429: "The model's request queue is full; retry after the `Retry-After` header's seconds.",
        503: "The model cannot be loaded, or the server is shutting down.",
    }.items()
}
_SSE = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or with `stream` SSE `data:` chunks ending in `data: [DONE]`."}}

router = APIRouter(prefix="/v1", tags=["openai"], responses=_ERRORS)


def _openai_error(exc: ApiError, param: str | None = None) -> ApiError:
    """The service's error with OpenAI's `param` and `code` added (the error handler renders it)."""
    exc.extra.setdefault("param", param)
    exc.extra.setdefault("code", exc.type)
    return exc


def _split_model(model: str) -> tuple[str, str | None]:
    target, sep, skill = model.partition(":")
    if not target or (sep and not skill):
        raise _openai_error(Invalid(f"model {model!r} must be `<model>` or `<model>:<skill>`", type="invalid_model"), "model")
    return target, skill or None


async def _submit(req, generation, *, prompts=None, messages=None, logprobs=None, prompt_logprobs=None) -> Queued:
    """The one generation path, with errors in OpenAI's shape (`param` names the field at fault). Several
    prompts (completions) are queued together, `n` each: all or none."""
    target, skill = _split_model(req.model)
    queued: list[Queued] = []
    try:
        params = generation.sampling(
            max_tokens=req.max_tokens if req.max_tokens is not None else min(DEFAULT_MAX_TOKENS, int(generation.settings.max_new_tokens)),
            temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )  # fmt: skip
        common = dict(model=target, skill=skill, params=params, sae=req.sae, compare=req.compare, n=req.n)
        calls = [GenerationCall(**common, messages=messages)] if messages is not None else [
            GenerationCall(**common, **({"prompt": p} if isinstance(p, str) else {"prompt_ids": p})) for p in prompts
        ]  # fmt: skip
        for call in calls:
            queued.append(await generation.submit(call))
        return Queued.joined(queued)
    except ApiError as exc:
        for q in queued:
            q.cancel()
        raise _openai_error(exc, "model" if exc.status in (404, 409) else exc.extra.get("param")) from None


async def _complete(request: Request, queued: Queued, generation) -> list:
    """The request's Completions (two with `compare`); a client that disconnects meanwhile cancels them."""
    try:
        return await generation.complete(queued, request.is_disconnected)
    except ApiError as exc:
        raise _openai_error(exc) from None


async def _events(queued: Queued):
    """(choice index, Delta | Completion) items, the first of each already produced, so that errors
    before the first token (adapter load failure, corrupt artifact) are an HTTP error, not a broken stream."""
    try:
        return await queued.open()
    except ApiError as exc:
        raise _openai_error(exc) from None


def _sse(payloads) -> StreamingResponse:
    async def body():
        async for payload in payloads:
            yield f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(completions, n: int = 1) -> CompletionUsage:
    """Usage of the choices of one request: each prompt counted once (its `n` samples share it, as OpenAI's)."""
    prompt = sum(c.usage.prompt_tokens for c in completions[::n])
    generated = sum(c.usage.completion_tokens for c in completions)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _legacy_logprobs(tokenizer, entries: list, start: int = 0) -> CompletionLogprobs:
    """OpenAI's completions logprobs for (token_id, TokenLogprob | None) entries; offsets from `start`."""
    tokens, offsets, offset = [], [], start
    for token_id, _ in entries:
        tokens.append(_token(tokenizer, token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[tl.logprob if tl is not None else None for _, tl in entries],
        top_logprobs=[{_token(tokenizer, t): lp for t, lp in tl.top} if tl is not None else None for _, tl in entries],
        text_offset=offsets,
    )


def _chat_logprobs(tokenizer, logprobs: list) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> dict:
        text = _token(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return ChatLogprobs(content=[ChatTokenLogprob(**top(tl.token_id, tl.logprob), top_logprobs=[top(t, lp) for t, lp in tl.top]) for tl in logprobs])


def _echo(completion, tokenizer, want_logprobs: bool) -> tuple[str, list]:
    """The prompt's text and its (token id, logprob) entries, for `echo`."""
    text = tokenizer.decode(completion.prompt_token_ids, skip_special_tokens=False)
    entries = list(zip(completion.prompt_token_ids, completion.prompt_logprobs or [None] * len(completion.prompt_token_ids))) if want_logprobs else []
    return text, entries


def _completion_choice(index: int, c, req: CompletionRequest, tokenizer) -> CompletionChoice:
    text, entries = (_echo(c, tokenizer, req.logprobs is not None) if req.echo else ("", []))
    if req.logprobs is not None:
        entries += [(tl.token_id, tl) for tl in c.logprobs or []]
    logprobs = _legacy_logprobs(tokenizer, entries) if req.logprobs is not None else None
    return CompletionChoice(index=index, text=text + c.text, finish_reason=c.finish_reason, logprobs=logprobs)


async def _error_tail(items, make_chunk):
    """Pass chunks through; a failure mid-stream ends it with an error object (the status is sent)."""
    try:
        async for payload in make_chunk(items):
            yield payload
    except Exception as exc:  # noqa: BLE001 - the status line is already out; tell the client in-band
        api = as_engine_error(exc)
        yield {"error": {"message": api.message, "type": api.type, "param": None, "code": api.type}}


@router.post("/completions", response_model=CompletionResponse, summary="Text completion (OpenAI-compatible)", responses=_SSE)
async def completions(req: CompletionRequest, request: Request, _: GenerateAccess, generation: GenerationDep):
    """`model`: `<model>` or `<model>:<skill>`; `prompt`: a string, token ids, or a list of either (choice
    p * n + i is sample i of prompt p); `logprobs` N returns each token's logprob and its N likeliest
    alternatives; `echo` puts the prompt before the completion (with `logprobs`, scored too; `max_tokens: 0`
    only scores it). `stream: true` sends `text_completion` chunks, then `[DONE]`."""
    prompt_logprobs = req.logprobs if req.echo else None
    queued = await _submit(req, generation, prompts=req.prompts(), logprobs=req.logprobs, prompt_logprobs=prompt_logprobs)
    rid, created, tok = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), queued.tokenizer
    if not req.stream:
        done = await _complete(request, queued, generation)
        choices = [_completion_choice(i, c, req, tok) for i, c in enumerate(done)]
        return _response(CompletionResponse, rid, created, req, queued, done, choices)
    items = await _events(queued)

    def chunk(index: int, text: str, finish=None, entries=None, usage=None) -> dict:
        logprobs = _legacy_logprobs(tok, entries) if entries is not None and req.logprobs is not None else None
        choice = CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)
        return CompletionChunk(id=rid, created=created, model=req.model, choices=[choice], usage=usage).model_dump()

    async def chunks(items):
        from resa_engine.engine import Delta

        echoed: set[int] = set()
        async for index, item in items:
            if isinstance(item, Delta):
                if item.text or item.logprobs:
                    yield chunk(index, item.text, entries=[(tl.token_id, tl) for tl in item.logprobs or []])
            else:
                if req.echo and index not in echoed:  # the prompt (and its scores) once the request is through
                    echoed.add(index)
                    text, entries = _echo(item, tok, req.logprobs is not None)
                    yield chunk(index, text, entries=entries)
                yield chunk(index, "", item.finish_reason, usage=_usage([item]))

    return _sse(_error_tail(items, chunks))


def _response(cls, rid: str, created: int, req, queued, done: list, choices: list) -> dict:
    """A whole (non-streamed) completion response: the choices, usage, and how the skill was served."""
    usage = _usage(done, len(done) if req.compare else req.n)
    served = dict(cross_model=queued.cross_model, adapter_target=queued.adapter_target, sae=queued.sae)
    return cls(id=rid, created=created, model=req.model, choices=choices, usage=usage, **served).model_dump()


@router.post("/chat/completions", response_model=ChatCompletionResponse, summary="Chat completion (OpenAI-compatible)", responses=_SSE)
async def chat_completions(req: ChatCompletionRequest, request: Request, _: GenerateAccess, generation: GenerationDep):
    """Messages are rendered with the model's chat template; `stream: true` sends
    `chat.completion.chunk` events (role first, then content deltas, then `finish_reason` and `usage`)."""
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    queued = await _submit(req, generation, messages=[m.model_dump() for m in req.messages], logprobs=logprobs)
    rid, created, tok = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), queued.tokenizer
    if not req.stream:
        done = await _complete(request, queued, generation)
        choices = [
            ChatCompletionChoice(
                index=i, message=ChatCompletionMessage(content=c.text), finish_reason=c.finish_reason,
                logprobs=_chat_logprobs(tok, c.logprobs) if logprobs is not None else None,
            )  # fmt: skip
            for i, c in enumerate(done)
        ]
        return _response(ChatCompletionResponse, rid, created, req, queued, done, choices)
    items = await _events(queued)

    def chunk(index: int, delta: ChatDelta, finish=None, usage=None, token_logprobs=None) -> dict:
        lp = _chat_logprobs(tok, token_logprobs) if token_logprobs and logprobs is not None else None
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=lp)
        return ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[choice], usage=usage).model_dump(exclude_none=True)

    async def chunks(items):
        from resa_engine.engine import Delta

        for index in range(len(queued.handles)):
            yield chunk(index, ChatDelta(role="assistant", content=""))
        async for index, item in items:
            if isinstance(item, Delta):
                if item.text or item.logprobs:
                    yield chunk(index, ChatDelta(content=item.text), token_logprobs=item.logprobs)
            else:
                yield chunk(index, ChatDelta(), item.finish_reason, _usage([item]))

    return _sse(_error_tail(items, chunks))


def _epoch(value) -> int:
    try:
        return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


@router.get("/models", response_model=OpenAIModelList, summary="Base models and `<target>:<skill>` adapters (OpenAI-compatible)")
async def list_models(_: GenerateAccess, generation: GenerationDep, store: StoreDep):
    """Every registered model, and one entry per stored adapter with `parent` = its target model."""
    names = generation.model_names
    cards = [ModelCard(id=name, root=name) for name in names]
    manifests = await asyncio.to_thread(store.list, "adapter")
    for m in sorted(manifests, key=lambda m: tuple(m["key"])):
        target, skill = m["key"]
        if target in names:
            cards.append(ModelCard(id=f"{target}:{skill}", created=_epoch(m.get("created_at", "")), parent=target, root=target))
    return OpenAIModelList(data=cards).model_dump()
