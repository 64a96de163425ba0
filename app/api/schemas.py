"""Every request and response body of the HTTP API, in one place.

Requests are strict (unknown fields are a 422, so a typo never silently falls back to a
default); job request bodies are passed on unchanged, as JSON, to the task functions.
Names are registered model names and store names, never filesystem paths.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
"""Skill, model and target names: what the store accepts, and nothing that reads as a path."""
SHA_PATTERN = r"^[0-9a-f]{64}$"


def _no_dotdot(value: str) -> str:
    if ".." in value:
        raise ValueError("names may not contain '..'")
    return value


Name = Annotated[str, Field(pattern=NAME_PATTERN), AfterValidator(_no_dotdot)]
"""A model, skill or target name: letters, digits, '.', '_', '-'; never a path."""
DatasetId = Annotated[str, Field(pattern=SHA_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    type: str = Field(description="Machine-readable error kind, e.g. `not_found`, `invalid_request`, `conflict`.")
    message: str = Field(description="One line saying what is wrong.")
    request_id: str | None = None
    model_config = ConfigDict(extra="allow")


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERROR_MEANING = {
    401: "Missing or invalid API key.",
    403: "The API key's scope does not allow this.",
    404: "Unknown model, skill, adapter, dataset or job.",
    409: "Name taken, job in the wrong state, or adapter incompatible with the model.",
    413: "Body or prompt over the server's limit.",
    415: "Unsupported content type.",
    422: "Invalid request (the message says which field and why).",
    503: "The job queue (Redis) or the model is unavailable.",
}


def error_responses(*codes: int) -> dict:
    """OpenAPI `responses` for error statuses, all in the one error shape."""
    return {code: {"model": ErrorResponse, "description": _ERROR_MEANING[code]} for code in codes}


# ---------------------------------------------------------------- probes and models


class Check(BaseModel):
    ok: bool
    detail: str | None = None


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, Check]


class Liveness(BaseModel):
    status: Literal["ok"]


class ModelInfo(BaseModel):
    name: str
    architecture: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    kind: str | None = Field(None, description="Registry source kind: `path`, `gguf` or `hf_id`.")
    description: str = ""
    loaded: bool = Field(False, description="Loaded in this API process for generation.")
    default: bool = False
    error: str | None = Field(None, description="Why the model cannot be described (e.g. its files are missing).")


class ModelList(BaseModel):
    models: list[ModelInfo]


# ---------------------------------------------------------------- datasets


class DatasetUpload(Strict):
    rows: list[Any] = Field(..., description="QA rows: objects with `question` (or `problem`/`prompt`) and `answer`.")


class DatasetInfo(BaseModel):
    id: str = Field(description="The dataset id: sha256 of its normalized JSONL.")
    rows: int
    sha256: str
    bytes: int


class DatasetList(BaseModel):
    datasets: list[DatasetInfo]


# ---------------------------------------------------------------- jobs


class JobProgress(BaseModel):
    stage: str | None = None
    step: int = 0
    total: int | None = None
    eta_s: float | None = None
    metrics: dict[str, float] = {}


class JobError(BaseModel):
    type: str
    message: str
    model_config = ConfigDict(extra="allow")


class JobView(BaseModel):
    id: str
    kind: str = Field(description="`extract`, `tune` or `eval`.")
    state: Literal["queued", "started", "finished", "failed", "canceled"]
    status: str = Field(description="The underlying RQ status (`deferred` while waiting on a parent job).")
    progress: JobProgress
    result: dict[str, Any] | None = Field(None, description="The task's result once finished (artifact summary, eval report).")
    error: JobError | None = Field(None, description="Why the job failed or was canceled.")
    created_at: str | None = None
    enqueued_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    depends_on: list[str] = []
    dependents: list[str] = []
    skill: str | None = None
    target: str | None = None
    worker: str | None = None
    cancel_requested: bool = False
    params: dict[str, Any] | None = Field(None, description="The request body the job runs with.")


class JobList(BaseModel):
    jobs: list[JobView]


# ---------------------------------------------------------------- skills and adapters


class SkillSource(Strict):
    model: Name = Field(description="Registered source model name.")
    adapter: Name | None = Field(
        None,
        description="Optional adapter from the store applied to the source first, named by its skill "
        "(`adapters/<model>/<adapter>`), e.g. an RL-tuned reasoning adapter.",
    )


class SaeParams(Strict):
    num_latents: int | None = Field(None, ge=1, le=1 << 20, description="SAE width; default d_in x expansion_factor.")
    expansion_factor: int | None = Field(None, ge=1, le=256)
    k: int | None = Field(None, ge=1, le=4096, description="TopK active latents (paper: 32).")


class LoraParams(Strict):
    r: int | None = Field(None, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0)
    dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: list[str] | None = None


class TuneTrain(Strict):
    """Further tuning options (resa_engine.tune.TuneConfig)."""

    grad_clip: float | None = Field(None, ge=0, description="Max global gradient norm; 0 disables clipping (default 1.0).")
    weight_decay: float | None = Field(None, ge=0, description="AdamW decoupled weight decay (default 0).")
    checkpoint_every: int | None = Field(None, ge=1, description="Optimizer steps between resumable checkpoints.")


class TuneOptions(Strict):
    """Adapter-building options (resa_engine.tune.TuneConfig); unset fields take the authors' recipe."""

    dataset: DatasetId | None = Field(None, description="Dataset id; default: the skill's dataset.")
    objective: Literal["kl", "ce"] | None = Field(None, description="`kl` (authors' code, default) or `ce` (paper text).")
    layer: int | None = Field(None, ge=0, description="Which of the skill's SAE layers to splice; default the skill's default layer.")
    splice_grad: bool | None = Field(None, description="Let gradients flow through the SAE splice (default off, as in the authors' code).")
    lr: float | None = Field(None, gt=0, lt=1, description="AdamW learning rate (default 1e-6).")
    epochs: float | None = Field(None, gt=0, le=1000, description="Passes over the chunked dataset (default 2).")
    batch_size: int | None = Field(None, ge=1, le=1024, description="Chunks per optimizer step (default 1).")
    chunk_len: int | None = Field(None, ge=2, le=32768, description="Tokens per chunk (default 2048).")
    schedule: Literal["constant", "cosine"] | None = None
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    seed: int | None = None
    lora: LoraParams | None = None
    train: TuneTrain | None = None
    replace: bool | None = Field(None, description="Replace an existing adapter for this target and skill.")


class SkillCreate(Strict):
    name: Name = Field(description="New skill name.")
    source: SkillSource
    layers: list[int] = Field(..., min_length=1, max_length=64, description="0-based decoder layers to train SAEs on.")
    dataset: DatasetId = Field(description="Dataset id from POST /datasets.")
    sae: SaeParams = SaeParams()
    train: dict[str, Any] | None = Field(
        None, description="Training options (resa_engine.extract.ExtractConfig: chunk_len, max_tokens, batch_size, lr, seed, ...)."
    )
    adapters_for: list[Name] | None = Field(
        None, max_length=32, description="Target models to build adapters for once extraction finishes (chained jobs)."
    )
    tune: TuneOptions | None = Field(None, description="Options for the chained adapter jobs of `adapters_for`.")
    default_layer: int | None = Field(
        None, ge=0, description="The skill's default layer (one of `layers`); default: the best held-out loss recovered."
    )
    init_from: Name | None = Field(None, description="A stored skill to fine-tune the SAEs from.")
    replace: bool | None = Field(None, description="Replace an existing skill of that name.")

    @model_validator(mode="after")
    def _default_layer(self) -> "SkillCreate":
        if self.default_layer is not None and self.default_layer not in self.layers:
            raise ValueError(f"default_layer {self.default_layer} is not one of the layers {self.layers}")
        return self

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value):
            raise ValueError("layers are 0-based and must be >= 0")
        if len(set(value)) != len(value):
            raise ValueError("layers must not repeat")
        return value

    @field_validator("adapters_for")
    @classmethod
    def _targets(cls, value: list[str] | None) -> list[str] | None:
        if value and len(set(value)) != len(value):
            raise ValueError("adapters_for must not repeat a target")
        return value


class SkillAccepted(BaseModel):
    skill: str
    job: JobView
    adapter_jobs: list[JobView] = []


class AdapterCreate(TuneOptions):
    target: Name = Field(description="Registered target model name.")


class AdapterAccepted(BaseModel):
    skill: str
    target: str
    job: JobView


class AdapterInfo(BaseModel):
    target: str
    skill: str
    manifest: dict[str, Any]


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


class SkillInfo(BaseModel):
    name: str
    manifest: dict[str, Any]
    metrics: dict[str, Any] = {}
    adapters: list[str] = Field([], description="Targets the skill has an adapter for.")


class SkillList(BaseModel):
    skills: list[SkillInfo]


class Deleted(BaseModel):
    deleted: dict[str, Any]


# ---------------------------------------------------------------- evals


ADAPTER_REF_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9._-]{0,99}:)?[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
AdapterRef = Annotated[str, Field(pattern=ADAPTER_REF_PATTERN), AfterValidator(_no_dotdot)]
"""A stored adapter: `skill` (built on the model itself) or `target:skill` (built on another model)."""


class EvalSource(Strict):
    model: Name = Field(description="Registered source model name.")
    skill: AdapterRef | None = Field(None, description="The source's adapter, by skill (or `target:skill`).")
    adapter: AdapterRef | None = Field(None, description="Same as `skill`; give at most one.")


class EvalCreate(Strict):
    model: Name = Field(description="Registered model name.")
    skill: AdapterRef | None = Field(
        None, description="Also evaluate with this adapter attached: `skill` (built on `model`) or `target:skill` (cross-model)."
    )
    dataset: DatasetId = Field(description="Dataset id of verified QA rows.")
    samples: int | None = Field(None, ge=1, le=64, description="Completions per question (pass@1 averages them).")
    limit: int | None = Field(None, ge=1, description="Evaluate the first N questions only.")
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    batch_size: int | None = Field(None, ge=1, le=1024)
    prompt_format: Literal["resa", "chat"] | None = None
    source: EvalSource | None = Field(None, description="Also evaluate the source model, for the retention ratio.")

    @model_validator(mode="after")
    def _one_source_adapter(self) -> "EvalCreate":
        if self.source and self.source.skill and self.source.adapter:
            raise ValueError("give at most one of source.skill or source.adapter")
        return self


class EvalAccepted(BaseModel):
    job: JobView


# ---------------------------------------------------------------- generation


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class SteerEdit(Strict):
    latent: int = Field(ge=0, description="Latent index in the skill's SAE.")
    mode: Literal["clamp", "add", "scale"] = Field(description="`clamp`: set the activation to `value`; `add`: add it; `scale`: multiply by it.")
    value: float = Field(allow_inf_nan=False)


class SteerSpec(Strict):
    """Per-request steering: the skill's SAE at `layer` encodes the residual stream, the edits change
    its latents, and the change of the decoded vector is added (the reconstruction error is kept,
    so no edits leave the output unchanged)."""

    skill: Name = Field(description="The skill whose SAE steers (its width must be the model's hidden size).")
    layer: int | None = Field(None, ge=0, description="Which of the skill's SAE layers; default the skill's default layer.")
    edits: list[SteerEdit] = Field(default_factory=list, max_length=64, description="Latent edits, applied at every token.")

    @model_validator(mode="after")
    def _distinct(self) -> "SteerSpec":
        latents = [e.latent for e in self.edits]
        if len(set(latents)) != len(latents):
            raise ValueError("each latent may be edited once per request")
        return self


class GenerateRequest(Strict):
    model: Name | None = Field(None, description="Registered model name; default: the server's default model.")
    skill: Name | None = Field(None, description="Attach this skill's adapter for this request.")
    prompt: str | None = Field(None, description="Raw prompt text (no chat template).")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="Chat messages (the model's chat template is applied).")
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: list[str] | str | None = None
    stream: bool = False
    sae: SteerSpec | None = Field(None, description="Steer this request with a skill's SAE latent edits.")
    compare: bool = Field(False, description="With `sae`: also return the unsteered completion (`unsteered`), decoded in the same batch.")

    @model_validator(mode="after")
    def _one_input(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop and (len(self.stop) > 16 or any(len(s) > 256 for s in self.stop)):
            raise ValueError("stop: at most 16 strings of at most 256 characters")
        if self.compare and self.sae is None:
            raise ValueError("`compare` needs an `sae` block to compare against")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SteeringApplied(BaseModel):
    skill: str
    layer: int = Field(description="The block whose output was edited.")
    edits: int = Field(description="Number of latent edits.")


class UnsteeredCompletion(BaseModel):
    text: str
    finish_reason: str
    usage: Usage


class GenerateResponse(BaseModel):
    text: str
    finish_reason: str = Field(description="`stop` (EOS or a stop string) or `length`.")
    usage: Usage
    model: str
    skill: str | None = None
    cross_model: bool = Field(False, description="The skill's adapter was built on another (compatible) model.")
    adapter_target: str | None = Field(None, description="The model the attached adapter was built on.")
    sae: SteeringApplied | None = Field(None, description="The steering applied, when the request had an `sae` block.")
    unsteered: UnsteeredCompletion | None = Field(None, description="With `compare`: the same request without the edits.")


# ---------------------------------------------------------------- transparency


class InspectRequest(Strict):
    model: Name = Field(description="Registered model name whose residual stream the skill's SAE reads (same hidden size).")
    prompt: str = Field(..., min_length=1, description="Text to inspect (tokenized without special tokens, as in training).")
    layer: int | None = Field(None, ge=0, description="Which of the skill's SAE layers; default the skill's default layer.")
    top: int = Field(8, ge=1, le=256, description="Strongest active latents shown per token.")


class LatentActivation(BaseModel):
    index: int = Field(description="Latent index in the SAE.")
    activation: float


class TokenLatentsView(BaseModel):
    token: str = Field(description="The token as text (decoded on its own).")
    token_id: int
    position: int = Field(description="0-based position in the prompt.")
    latents: list[LatentActivation] = Field(description="Active latents (activation > 0), strongest first.")


class InspectResponse(BaseModel):
    skill: str
    model: str
    layer: int
    tokens: list[TokenLatentsView] = Field(description="One entry per prompt token, in order.")


class LatentContextView(BaseModel):
    chunk: int = Field(description="Corpus chunk the firing token is in.")
    position: int = Field(description="Position of the firing token in that chunk.")
    activation: float
    token_id: int
    token: str = Field(description="The firing token as text.")
    before: str = Field(description="Tokens before it, as text.")
    after: str = Field(description="Tokens after it, as text.")
    text: str = Field(description="`before «token» after`: the window with the firing token marked.")


class LatentCardView(BaseModel):
    skill: str
    layer: int
    index: int = Field(description="Latent index in the SAE.")
    num_latents: int
    density: float = Field(description="Fraction of counted corpus tokens where the latent is active (0: dead).")
    mean_activation: float = Field(description="Mean activation where it is active.")
    num_tokens: int = Field(description="Corpus tokens the card was computed over.")
    contexts: list[LatentContextView] = Field(description="Top-activating contexts, strongest first.")


class LayerReportRow(BaseModel):
    layer: int
    fvu: float | None = Field(None, description="Held-out fraction of variance unexplained (lower is better).")
    dead_fraction: float | None = Field(None, description="Share of latents that never fired in training.")
    loss_recovered: float | None = Field(None, description="Next-token loss recovered by the SAE splice vs zero-ablation.")
    reasoning_features: int | None = Field(None, description="Latents firing on the think tags of the system prompt only (paper §5).")


class LayerReport(BaseModel):
    skill: str | None = None
    default_layer: int | None = None
    layers: list[LayerReportRow]
