"""POST /generate: a completion on a registered model, with a skill's adapter attached per request."""

from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.api.deps import GenerateAccess, GenerationDep
from app.api.schemas import GenerateRequest, GenerateResponse, error_responses

router = APIRouter(tags=["generate"], responses=error_responses(401, 403, 422))


@router.post(
    "/generate",
    response_model=GenerateResponse,
    summary="Generate a completion (stream=true: Server-Sent Events of text deltas)",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or with `stream` SSE `data:` events ending in `[DONE]`."},
        **error_responses(404, 409, 413, 503),
    },
)
async def generate(req: GenerateRequest, _: GenerateAccess, generation: GenerationDep):
    """With `skill`, the skill's adapter for this model is attached; if there is none, one built on
    a compatible model is (`cross_model: true`); if none fits, 409 with the reasons."""
    if not req.stream:
        return await generation.generate(req)
    events = await generation.stream(req)  # errors surface here, before the stream starts

    async def body():
        async for event in events:
            yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
