"""Generation in the API process: the one handler behind /generate and the OpenAI-compatible /v1 routes.

`GenerationService.submit(call)` checks a request against the one set of limits, resolves the
model (registered names only, its engine loaded on first use), the skill's adapter for that model
(or a compatible adapter built on another model: a cross-model attach, paper §4.3) and the
request's SAE (steering or splice at one layer), and queues it on the model's engine; `compare`
queues the same request without the SAE beside it, `n` several samples. The routes then either
wait for the completions (`complete`, which cancels them if the client goes away) or stream them
(`Queued.open`). Every failure is an ApiError with a 4xx/5xx status and a reason.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable

from adapters_store.store import version_of
from app.api.errors import ApiError, Invalid, TooLarge, Unavailable, as_api_error
from app.services.catalog import ModelCatalog, resolve_adapter_target
from app.services.engines import ServedModels, adapter_key
from app.settings import Settings

log = logging.getLogger("resa.generation")

MAX_STOPS = 16
MAX_STOP_CHARS = 256
DISCONNECT_POLL_S = 0.5


class ClientGone(ApiError):
    """The client closed the connection before its completion was ready: the request was cancelled."""

    status, type = 499, "client_closed_request"


@dataclass
class GenerationCall:
    """One generation request in service terms, whichever route it came from."""

    model: str
    skill: str | None
    params: Any
    """resa_engine.sampling.SamplingParams (from `GenerationService.sampling`)."""
    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_ids: list[int] | None = None
    """The prompt as token ids (OpenAI's completions accept those), instead of `prompt` or `messages`."""
    sae: Any = None
    """The request's `sae` block (schemas.SaeSpec), or None."""
    compare: bool = False
    n: int = 1


@dataclass
class Queued:
    """A request queued on its model's engine, with what the response must say about it.

    `handles[i]` is sample i (n > 1: seeds seed, seed+1, ...); with `compare`, the last handle is the
    same request without the SAE, decoded in the same batch."""

    handles: list
    model: str
    skill: str | None
    cross_model: bool
    adapter_target: str | None
    prompt_tokens: int
    sae: dict | None = None
    """{"skill", "layer", "mode", "edits"} when the request has an SAE."""
    compare: bool = False
    tokenizer: Any = None
    """The served model's tokenizer (token ids to text, for logprobs and echo)."""

    @classmethod
    def joined(cls, parts: list["Queued"]) -> "Queued":
        """Several prompts of one request as one: handles in order (prompt after prompt, n each)."""
        first = parts[0]
        return replace(first, handles=[h for q in parts for h in q.handles], prompt_tokens=sum(q.prompt_tokens for q in parts))

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def open(self) -> AsyncIterator[tuple[int, Any]]:
        """(index, Delta | Completion) items of every handle, interleaved as they are decoded. Each
        handle's first item is awaited here, so a failure before the first token (adapter load,
        corrupt artifact) raises from `open()` rather than mid-stream. Closing the iterator early
        cancels whatever is still running."""
        primed = []
        try:
            for handle in self.handles:
                primed.append(await _primed(handle.stream()))
        except BaseException as exc:
            for stream in primed:
                await stream.aclose()
            self.cancel()
            if isinstance(exc, Exception):
                raise as_engine_error(exc) from None
            raise
        return _merge(primed)

    async def results(self) -> list:
        """Every handle's Completion, in order (cancels the rest if one fails)."""
        out: dict[int, Any] = {}
        items = await self.open()
        try:
            async for index, item in items:
                if hasattr(item, "finish_reason"):
                    out[index] = item
        except Exception as exc:  # noqa: BLE001 - the request's own failure, as an HTTP error
            raise as_engine_error(exc) from None
        finally:
            await items.aclose()
        return [out[i] for i in range(len(self.handles))]


class GenerationService:
    """Completions on registered models with a skill attached per request, through the models' engines."""

    def __init__(self, settings: Settings, store, catalog: ModelCatalog | None = None):
        self.settings, self.store = settings, store
        self.catalog = catalog or ModelCatalog(settings)
        self.models = ServedModels(settings, store, self.catalog)

    # ------------------------------------------------------------ models

    @property
    def model_names(self) -> list[str]:
        return self.catalog.names()

    @property
    def loaded_models(self) -> list[str]:
        return self.models.names

    def is_loaded(self, name: str) -> bool:
        return name in self.models.names

    def load_error(self, name: str) -> str | None:
        return self.models.load_errors.get(name)

    def start_loading(self, name: str):
        return self.models.start_loading(name)

    def engine_stats(self) -> dict[str, dict]:
        return {name: self.models.get(name).engine.stats().to_dict() for name in self.models.names}

    async def run_on_base(self, name: str, fn):
        """`fn(LoadedModel)` on the base weights of the served model (loaded on first use), run by its
        engine between steps, so it never races a batch's adapters or hooks."""
        from resa_engine.errors import EngineStopped

        self.catalog.spec(name)
        served = await asyncio.to_thread(self.models.get, name)
        try:
            return await asyncio.wrap_future(served.engine.call(fn))
        except EngineStopped as exc:
            raise Unavailable(str(exc), type="engine_stopped") from None

    def forget_skill(self, skill: str) -> None:
        """A deleted skill: drop its SAEs. Its adapters become unreachable (the store no longer resolves
        them) and leave the adapter caches by LRU."""
        self.models.forget_skill(skill)

    def close(self) -> None:
        self.models.close()

    # ------------------------------------------------------------ requests

    def model_or_default(self, name: str | None) -> str:
        model = name or self.settings.default_model
        if not model:
            raise Invalid("no `model` given and the server has no default model", param="model")
        return model

    def sampling(
        self, *, max_tokens: int, temperature: float, top_p: float, seed: int | None, stop, logprobs: int | None = None, prompt_logprobs: int | None = None
    ) -> Any:
        """SamplingParams within this server's limits (the same for every route): 422 naming the field."""
        from resa_engine.sampling import SamplingParams

        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS or any(not isinstance(s, str) or len(s) > MAX_STOP_CHARS for s in stops):
            raise Invalid(f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters", param="stop")
        if max_tokens > self.settings.max_new_tokens:
            raise Invalid(
                f"max_tokens {max_tokens} is over this server's limit of {self.settings.max_new_tokens}",
                type="max_tokens_too_large", param="max_tokens",
            )  # fmt: skip
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stops, logprobs=logprobs, prompt_logprobs=prompt_logprobs
            )
        except ValueError as exc:
            param = next((p for p in ("seed", "temperature", "top_p", "max_tokens", "logprobs", "prompt_logprobs") if str(exc).startswith(p)), None)
            raise Invalid(str(exc), param=param) from None

    async def submit(self, call: GenerationCall) -> Queued:
        """Queue one request (errors raise here, before any response starts): 404 unknown model/skill,
        409 incompatible adapter or SAE, 413/422 limits, 429 queue full (Retry-After), 503 stopping."""
        self.catalog.spec(call.model)
        return await asyncio.to_thread(self._submit, call)

    def _submit(self, call: GenerationCall) -> Queued:
        from resa_engine.errors import EngineStopped, QueueFull

        served = self.models.get(call.model)
        ids = self._prompt_ids(served, call)
        target, key = None, None
        if call.skill:
            target, manifest, _ = resolve_adapter_target(self.store, call.model, call.skill, served.engine.shapes)
            key = adapter_key(target, call.skill, version_of(manifest))
        splice, sae_info = self.models.sae(served, call.sae) if call.sae is not None else (None, None)
        handles = []
        try:
            for i in range(call.n):
                params = call.params
                if i and params.seed is not None:  # sample i of n: its own seed, so samples differ yet reproduce
                    params = replace(params, seed=_next_seed(params.seed, i))
                handles.append(served.engine.submit(ids, params, key, sae=splice))
            if call.compare:
                handles.append(served.engine.submit(ids, call.params, key))
        except (QueueFull, EngineStopped, ValueError) as exc:
            for handle in handles:  # all of a request's completions run, or none
                handle.cancel()
            if isinstance(exc, QueueFull):
                retry = max(1, math.ceil(exc.retry_after_s))
                raise ApiError(str(exc), type="rate_limit_exceeded", status=429, headers={"Retry-After": str(retry)}) from None
            if isinstance(exc, EngineStopped):
                raise Unavailable(str(exc), type="engine_stopped") from None
            raise as_api_error(exc) or Invalid(str(exc)) from None  # an adapter that does not fit: 409
        cross = bool(target and target != call.model)
        return Queued(handles, call.model, call.skill, cross, target, len(ids), sae_info, call.compare, served.tokenizer)

    def _prompt_ids(self, served, call: GenerationCall) -> list[int]:
        """Token ids of the prompt; text that cannot fit the token limit is refused before tokenizing it."""
        from resa_engine.engine.text import format_prompt

        limit = int(self.settings.max_prompt_tokens)
        if call.prompt_ids is not None:
            if len(call.prompt_ids) > limit:
                raise TooLarge(f"prompt is {len(call.prompt_ids)} tokens, over this server's limit of {limit}", type="prompt_too_long", param="prompt")
            return list(call.prompt_ids)  # the engine checks them against the vocabulary
        chars = len(call.prompt) if call.prompt is not None else sum(len(m.get("content") or "") for m in call.messages or [])
        if chars > limit * _max_token_chars(served.tokenizer):
            raise TooLarge(f"prompt is {chars} characters, more than {limit} tokens can hold", type="prompt_too_long", param="prompt")
        try:
            ids = format_prompt(served.tokenizer, call.prompt, call.messages)
        except ValueError as exc:
            raise Invalid(str(exc), param="prompt" if call.prompt is not None else "messages") from None
        if len(ids) > limit:
            raise TooLarge(f"prompt is {len(ids)} tokens, over this server's limit of {limit}", type="prompt_too_long", param="prompt")
        return ids

    async def complete(self, queued: Queued, is_disconnected: Callable[[], Awaitable[bool]]) -> list:
        """The request's Completions; a client that disconnects meanwhile cancels them (ClientGone, 499)."""
        task = asyncio.create_task(queued.results())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await is_disconnected():
                    queued.cancel()
                    raise ClientGone("the client closed the connection; the request was cancelled")
        except asyncio.CancelledError:
            queued.cancel()
            raise
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


def _next_seed(seed: int, i: int) -> int:
    """seed + i, wrapped into the signed 64-bit range a generator accepts."""
    return (seed + i + 2**63) % 2**64 - 2**63


def _max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for (vocabulary strings bound their decoded length)."""
    cached = getattr(tokenizer, "_resa_max_token_chars", None)
    if cached is None:
        cached = max((len(t) for t in tokenizer.get_vocab()), default=1) or 1
        try:
            tokenizer._resa_max_token_chars = cached
        except AttributeError:
            pass
    return cached


def as_engine_error(exc: BaseException) -> ApiError:
    """A request's failure raised from its engine stream (adapter load, mismatch, stop), as HTTP."""
    return as_api_error(exc) or ApiError(f"generation failed: {exc}")


async def _primed(stream: AsyncIterator) -> AsyncIterator:
    """`stream` with its first item already produced (a failure raises here)."""
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise

    async def rest():
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()  # leaving early (client gone) cancels the request

    return rest()


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave async iterators as (index, item); the first failure propagates and stops the others."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, done))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
