"""POST /generate: a completion on a registered model, with a skill's adapter and/or SAE attached per request."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.api.deps import GenerateAccess, GenerationDep
from app.api.schemas import GenerateRequest, GenerateResponse, error_responses
from app.services.generation import GenerationCall, Queued, as_engine_error

router = APIRouter(tags=["generate"], responses=error_responses(401, 403, 422))


def _completion(completion) -> dict:
    return {"text": completion.text, "finish_reason": completion.finish_reason, "usage": completion.usage.to_dict()}


def _result(queued: Queued, completion, unsteered=None) -> dict:
    result = {
        **_completion(completion),
        "model": queued.model,
        "skill": queued.skill,
        "cross_model": queued.cross_model,
        "adapter_target": queued.adapter_target,
    }
    if queued.sae is not None:
        result["sae"] = queued.sae
    if unsteered is not None:
        result["unsteered"] = _completion(unsteered)
    return result


@router.post(
    "/generate",
    response_model=GenerateResponse,
    summary="Generate a completion (stream=true: Server-Sent Events of text deltas)",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or with `stream` SSE `data:` events ending in `[DONE]`."},
        **error_responses(404, 409, 413, 429, 503),
    },
)
async def generate(req: GenerateRequest, request: Request, _: GenerateAccess, generation: GenerationDep):
    """With `skill`, the skill's adapter for this model is attached; if there is none, one built on
    a compatible model is (`cross_model: true`); if none fits, 409 with the reasons. With `sae`, the
    skill's SAE steers (or, `mode: splice`, replaces) the residual stream at its layer; `compare`
    also returns the completion without it. A client that goes away cancels its request."""
    params = generation.sampling(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop)
    messages = [m.model_dump() for m in req.messages] if req.messages is not None else None
    call = GenerationCall(
        model=generation.model_or_default(req.model), skill=req.skill, params=params,
        prompt=req.prompt, messages=messages, sae=req.sae, compare=req.compare,
    )  # fmt: skip
    queued = await generation.submit(call)
    if not req.stream:
        return _result(queued, *await generation.complete(queued, request.is_disconnected))
    items = await queued.open()  # errors before the first token surface here, as an HTTP error
    indexed = len(queued.handles) > 1

    async def events():
        try:
            async for index, item in items:
                tag = {"index": index} if indexed else {}
                if hasattr(item, "finish_reason"):
                    result = _result(queued, item) if index == 0 else _completion(item)
                    yield {"text": "", **tag, "done": True, **{k: v for k, v in result.items() if k != "text"}}
                elif item.text:
                    yield {"text": item.text, **tag}
        except Exception as exc:  # noqa: BLE001 - the status line is out; tell the client in-band
            api = as_engine_error(exc)
            yield {"error": {"type": api.type, "message": api.message}}
        finally:
            await items.aclose()  # a client that went away cancels the request

    async def body():
        async for event in events():
            yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
