"""OpenAI-compatible routes served by the continuous-batching scheduler: /v1/completions,
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
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    OpenAIModelList,
    OpenAIErrorResponse,
    CompletionUsage,
)
from app.generation import BatchedRequest, serving_error

DEFAULT_MAX_TOKENS = 256
DISCONNECT_POLL_S = 0.5

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


async def _submit(req, generation, *, prompt=None, messages=None) -> BatchedRequest:
    from resa_engine.sampling import SamplingParams

    target, skill = _split_model(req.model)
    try:
        params = SamplingParams(
            max_tokens=req.max_tokens or min(DEFAULT_MAX_TOKENS, int(generation.settings.max_new_tokens)),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=req.stops(),
        )
    except ValueError as exc:
        raise _openai_error(Invalid(str(exc))) from None
    try:
        return await generation.batched.submit(
            target, skill, prompt=prompt, messages=messages, params=params, sae=req.sae, compare=req.compare
        )
    except ApiError as exc:
        raise _openai_error(exc, "model" if exc.status in (404, 409) else None) from None


def _as_error(exc: BaseException) -> ApiError:
    api = serving_error(exc)
    return _openai_error(api if api is not None else ApiError(f"generation failed: {exc}"))


async def _complete(request: Request, queued: BatchedRequest) -> list:
    """The request's Completions (two with `compare`); a client that disconnects meanwhile cancels them."""
    task = asyncio.create_task(queued.results())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                queued.cancel()
                task.cancel()
                break
        return task.result()
    except asyncio.CancelledError:
        queued.cancel()
        raise
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - the request's own failure (adapter load, stop), rendered as an error object
        raise _as_error(exc) from None
    finally:
        if not task.done():
            task.cancel()


async def _events(queued: BatchedRequest):
    """(choice index, Delta | Completion) items, the first of each already produced, so that errors
    before the first token (adapter load failure, corrupt artifact) are an HTTP error, not a broken stream."""
    try:
        return await queued.open()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - see _complete
        raise _as_error(exc) from None


def _sse(payloads) -> StreamingResponse:
    async def body():
        async for payload in payloads:
            yield f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(*completions) -> CompletionUsage:
    """Usage of one completion, or of the choices of one request (the prompt counted once, as OpenAI's `n`)."""
    prompt = completions[0].usage.prompt_tokens
    generated = sum(c.usage.completion_tokens for c in completions)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)


async def _error_tail(items, make_chunk):
    """Pass chunks through; a failure mid-stream ends it with an error object (the status is sent)."""
    try:
        async for payload in make_chunk(items):
            yield payload
    except Exception as exc:  # noqa: BLE001 - the status line is already out; tell the client in-band
        api = _as_error(exc)
        yield {"error": {"message": api.message, "type": api.type, "param": None, "code": api.type}}


@router.post("/completions", response_model=CompletionResponse, summary="Text completion (OpenAI-compatible)", responses=_SSE)
async def completions(req: CompletionRequest, request: Request, _: GenerateAccess, generation: GenerationDep):
    """`model`: `<model>` or `<model>:<skill>`; `stream: true` sends `text_completion` chunks, then `[DONE]`."""
    queued = await _submit(req, generation, prompt=req.prompt)
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if not req.stream:
        completions = await _complete(request, queued)
        return CompletionResponse(
            id=rid,
            created=created,
            model=req.model,
            choices=[CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason) for i, c in enumerate(completions)],
            usage=_usage(*completions),
            cross_model=queued.cross_model,
            adapter_target=queued.adapter_target,
            sae=queued.steering,
        ).model_dump()
    items = await _events(queued)

    async def chunks(items):
        from resa_engine.serving import Delta

        async for index, item in items:
            if isinstance(item, Delta):
                if item.text:
                    choice = CompletionChoice(index=index, text=item.text, finish_reason=None)
                    yield CompletionChunk(id=rid, created=created, model=req.model, choices=[choice]).model_dump()
            else:
                yield CompletionChunk(
                    id=rid,
                    created=created,
                    model=req.model,
                    choices=[CompletionChoice(index=index, text="", finish_reason=item.finish_reason)],
                    usage=_usage(item),
                ).model_dump()

    return _sse(_error_tail(items, chunks))


@router.post("/chat/completions", response_model=ChatCompletionResponse, summary="Chat completion (OpenAI-compatible)", responses=_SSE)
async def chat_completions(req: ChatCompletionRequest, request: Request, _: GenerateAccess, generation: GenerationDep):
    """Messages are rendered with the model's chat template; `stream: true` sends
    `chat.completion.chunk` events (role first, then content deltas, then `finish_reason` and `usage`)."""
    queued = await _submit(req, generation, messages=[m.model_dump() for m in req.messages])
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if not req.stream:
        completions = await _complete(request, queued)
        choices = [
            ChatCompletionChoice(index=i, message=ChatCompletionMessage(content=c.text), finish_reason=c.finish_reason)
            for i, c in enumerate(completions)
        ]
        return ChatCompletionResponse(
            id=rid,
            created=created,
            model=req.model,
            choices=choices,
            usage=_usage(*completions),
            cross_model=queued.cross_model,
            adapter_target=queued.adapter_target,
            sae=queued.steering,
        ).model_dump()
    items = await _events(queued)

    def chunk(index: int, delta: ChatDelta, finish=None, usage=None) -> dict:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish)
        return ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[choice], usage=usage).model_dump(exclude_none=True)

    async def chunks(items):
        from resa_engine.serving import Delta

        for index in range(len(queued.handles)):
            yield chunk(index, ChatDelta(role="assistant", content=""))
        async for index, item in items:
            if isinstance(item, Delta):
                if item.text:
                    yield chunk(index, ChatDelta(content=item.text))
            else:
                yield chunk(index, ChatDelta(), item.finish_reason, _usage(item))

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
