"""Every request and response body of the HTTP API, in one place.

Requests are strict (unknown fields are a 422, so a typo never silently falls back to a
default); job request bodies are passed on unchanged, as JSON, to the task functions.
Names are registered model names and store names, never filesystem paths.

One module on purpose (as vLLM keeps its protocol in one file): every body of the API in one place,
read by the routes, the OpenAPI export and the tests alike; it is long because the API is.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
"""Skill, model and target names: what the store accepts, and nothing that reads as a path."""
SHA_PATTERN = r"^[0-9a-f]{64}$"
MAX_EDIT_VALUE = 1e4
"""Largest magnitude of a latent edit (SAE activations are O(1)-O(100); larger only overflows)."""


def _no_dotdot(value: str) -> str:
    if ".." in value:
        raise ValueError("names may not contain '..'")
    return value


def _unicode(value: str) -> str:
    """Text must be valid Unicode: a lone surrogate (JSON `"\\ud800"`) cannot be tokenized or stored."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone surrogate (U+{ord(value[exc.start]):04X} at character {exc.start}); send valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
"""Free text from a client (prompts, messages, stop strings): any valid Unicode."""

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
    429: "The model's request queue is full; retry after the `Retry-After` header's seconds.",
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
    kind: str = Field(description="`source`, `extract`, `tune` or `eval`.")
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
    alpha: float | None = Field(None, gt=0, allow_inf_nan=False)
    dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: list[str] | None = None


class TuneTrain(Strict):
    """Further tuning options (resa_engine.tune.TuneConfig)."""

    grad_clip: float | None = Field(None, ge=0, allow_inf_nan=False, description="Max global gradient norm; 0 disables clipping (default 1.0).")
    weight_decay: float | None = Field(None, ge=0, allow_inf_nan=False, description="AdamW decoupled weight decay (default 0).")
    checkpoint_every: int | None = Field(None, ge=1, description="Optimizer steps between resumable checkpoints.")
    heldout_fraction: float | None = Field(
        None, ge=0, lt=1, allow_inf_nan=False, description="Share of rows held out of tuning for the transfer diagnostics (default 0.1; 0: none)."
    )
    heldout_max_tokens: int | None = Field(None, ge=2, description="Cap on held-out tokens the transfer diagnostics score (default 4096).")


class TuneOptions(Strict):
    """Adapter-building options (resa_engine.tune.TuneConfig); unset fields take the authors' recipe."""

    dataset: DatasetId | None = Field(None, description="Dataset id; default: the skill's dataset.")
    objective: Literal["kl", "ce", "sft"] | None = Field(
        None, description="`kl` (authors' code, default), `ce` (paper text) or `sft` (the SFT baseline control: no SAE)."
    )
    random_sae: bool | None = Field(None, description="The random-SAE control: tune against an untrained SAE of the skill SAE's shape.")
    layer: int | None = Field(None, ge=0, description="Which of the skill's SAE layers to splice; default the skill's default layer.")
    splice_grad: bool | None = Field(None, description="Let gradients flow through the SAE splice (default off, as in the authors' code).")
    lr: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False, description="AdamW learning rate (default 1e-6).")
    epochs: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False, description="Passes over the chunked dataset (default 2).")
    batch_size: int | None = Field(None, ge=1, le=1024, description="Chunks per optimizer step (default 1).")
    chunk_len: int | None = Field(None, ge=2, le=32768, description="Tokens per chunk (default: 2048, capped at the model's context).")
    schedule: Literal["constant", "cosine"] | None = None
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    lora: LoraParams | None = None
    train: TuneTrain | None = None
    replace: bool | None = Field(None, description="Replace an existing adapter for this target and skill.")


class SourceCreate(Strict):
    """A source model to extract skills from: a LoRA trained on a registered model (resa_engine.sources)."""

    model: Name = Field(description="Registered model to train the source LoRA on.")
    name: Name = Field(description="The LoRA's name in the store: adapter (model, name), usable as `source.adapter` of POST /skills.")
    dataset: DatasetId = Field(description="Verified QA rows (POST /datasets): the training split.")
    method: Literal["grpo", "sft"] = Field(
        description="`grpo`: RL on an accuracy reward checked with math-verify, LoRA r32 on the 7 projections, as the paper's "
        "sources are made; `sft`: plain next-token training on the verified answers (cheaper, a weaker stand-in)."
    )
    options: dict[str, Any] | None = Field(
        None, description="Fields of the method's config (resa_engine.sources.grpo.GRPOSourceConfig or resa_engine.sources.sft.SFTConfig)."
    )
    replace: bool | None = Field(None, description="Replace an existing adapter of that name.")


class SourceAccepted(BaseModel):
    model: str
    name: str
    method: str
    options: dict[str, Any] = Field(description="The method's full config as the job will run it (defaults filled in).")
    job: JobView


class ExtractTrain(Strict):
    """Training options of an extraction (resa_engine.extract.ExtractConfig); unset fields keep its defaults."""

    chunk_len: int | None = Field(None, ge=2, le=1 << 20, description="Tokens per training sequence (default: 2048, capped at the model's context).")
    batch_size: int | None = Field(None, ge=1, le=4096, description="Sequences per optimizer step (default 8).")
    max_tokens: int | None = Field(None, ge=1, description="Cap on training tokens fed through the model.")
    epochs: int | None = Field(None, ge=1, le=1000)
    lr: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False, description="Learning rate (default: sparsify's, scaled by width).")
    optimizer: Literal["signum", "adam"] | None = None
    lr_warmup_steps: int | None = Field(None, ge=0)
    auxk_alpha: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    dead_feature_threshold: int | None = Field(None, ge=1)
    heldout_fraction: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)
    heldout_max_tokens: int | None = Field(None, ge=1)
    micro_batch_tokens: int | None = Field(None, ge=1)
    mask_special_tokens: bool | None = None
    checkpoint_every: int | None = Field(None, ge=0)
    cards: bool | None = Field(None, description="Write latent cards, reasoning-feature counts and the layer report (default on).")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)


class SkillCreate(Strict):
    name: Name = Field(description="New skill name.")
    source: SkillSource
    layers: list[int] = Field(..., min_length=1, max_length=64, description="0-based decoder layers to train SAEs on.")
    dataset: DatasetId = Field(description="Dataset id from POST /datasets.")
    sae: SaeParams = SaeParams()
    train: ExtractTrain | None = Field(None, description="Training options (resa_engine.extract.ExtractConfig).")
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


EVAL_CONTROLS = ("base", "source", "resa", "sae_kept", "random_sae", "sft", "self")
"""Arms an evaluation can ask for by name (with `skill`): the base; the source (the skill's source model and
adapter); Resa (base + the skill's adapter); Resa with the skill's SAE kept at inference (splice mode: the
Stage II student); the random-SAE control (an adapter tuned by the same recipe against an untrained SAE of
the same shape); the SFT control (the same LoRA trained with plain CE on the same trigger data); `self`
(the transfer repeated with the target as its own source). Missing control adapters are built first."""


class EvalArm(Strict):
    label: Name = Field(description="The arm's name in the report.")
    model: Name | None = Field(None, description="Registered model; default the evaluation's `model`.")
    adapter: AdapterRef | None = Field(None, description="An adapter on that model: `skill` or `target:skill`.")
    sae: "SaeSpec | None" = Field(None, description="A skill's SAE kept at inference for every request of the arm (steer or splice).")


class EvalCreate(Strict):
    model: Name = Field(description="Registered model name.")
    skill: AdapterRef | None = Field(
        None, description="Also evaluate with this adapter attached: `skill` (built on `model`) or `target:skill` (cross-model)."
    )
    dataset: DatasetId = Field(description="Dataset id of verified QA rows.")
    samples: int | None = Field(None, ge=1, le=64, description="Completions per question (pass@1 averages them).")
    limit: int | None = Field(None, ge=1, description="Evaluate the first N questions only.")
    temperature: float | None = Field(None, ge=0, le=5, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    batch_size: int | None = Field(None, ge=1, le=1024)
    prompt_format: Literal["resa", "chat"] | None = None
    source: EvalSource | None = Field(None, description="Also evaluate the source model, for the retention ratio.")
    controls: list[Literal[EVAL_CONTROLS]] | None = Field(  # type: ignore[valid-type]
        None, max_length=len(EVAL_CONTROLS), description="Arms by name, for `skill` (see the list in the API guide); missing control adapters are built first."
    )
    arms: list[EvalArm] | None = Field(None, max_length=16, description="Further arms, each scored on the same questions and seeds.")

    @model_validator(mode="after")
    def _one_source_adapter(self) -> "EvalCreate":
        if self.source and self.source.skill and self.source.adapter:
            raise ValueError("give at most one of source.skill or source.adapter")
        if self.controls is not None:
            if not self.skill or ":" in self.skill:
                raise ValueError("`controls` need `skill`, the name of a skill with an adapter built on `model`")
            if len(set(self.controls)) != len(self.controls):
                raise ValueError("`controls` must not repeat a name")
        labels = [a.label for a in self.arms or []]
        taken = {"base", "skill", "source", *(self.controls or [])}
        if len(set(labels)) != len(labels) or set(labels) & taken:
            raise ValueError(f"arm labels must be distinct and not one of {sorted(taken)}")
        return self


class EvalAccepted(BaseModel):
    job: JobView
    control_jobs: list[JobView] = Field([], description="Jobs building the control adapters the evaluation waits for.")


# ---------------------------------------------------------------- generation


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class SaeEdit(Strict):
    latent: int = Field(ge=0, description="Latent index in the skill's SAE.")
    mode: Literal["clamp", "add", "scale"] = Field(description="`clamp`: set the activation to `value`; `add`: add it; `scale`: multiply by it.")
    value: float = Field(ge=-MAX_EDIT_VALUE, le=MAX_EDIT_VALUE, allow_inf_nan=False, description=f"Finite, at most {MAX_EDIT_VALUE:g} in magnitude.")


class SaeSpec(Strict):
    """A skill's SAE attached to this request at one layer. `steer` (default): the SAE encodes the
    residual stream, the edits change its latents, and the change of the decoded vector is added (the
    reconstruction error is kept, so no edits leave the output unchanged). `splice`: the residual is
    replaced by the SAE's reconstruction (with the edits applied), as the SAE-guided tuning's student
    sees it; with the skill's adapter too, that is exactly the model Stage II trained."""

    skill: Name = Field(description="The skill whose SAE is attached (its width must be the model's hidden size).")
    layer: int | None = Field(None, ge=0, description="Which of the skill's SAE layers; default the skill's default layer.")
    mode: Literal["steer", "splice"] = Field("steer", description="`steer` keeps the reconstruction error; `splice` replaces the residual.")
    edits: list[SaeEdit] = Field(default_factory=list, max_length=64, description="Latent edits, applied at every token.")

    @model_validator(mode="after")
    def _distinct(self) -> "SaeSpec":
        latents = [e.latent for e in self.edits]
        if len(set(latents)) != len(latents):
            raise ValueError("each latent may be edited once per request")
        return self


class GenerateRequest(Strict):
    model: Name | None = Field(None, description="Registered model name; default: the server's default model.")
    skill: Name | None = Field(None, description="Attach this skill's adapter for this request.")
    prompt: Text | None = Field(None, description="Raw prompt text (no chat template).")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="Chat messages (the model's chat template is applied).")
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0, le=5, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, description="Same seed, same output; a signed 64-bit integer.")
    stop: list[Text] | Text | None = None
    stream: bool = False
    sae: SaeSpec | None = Field(None, description="Attach a skill's SAE to this request (steering edits, or splice mode).")
    compare: bool = Field(False, description="With `sae`: also return the completion without it (`unsteered`), decoded in the same batch.")

    @model_validator(mode="after")
    def _one_input(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.compare and self.sae is None:
            raise ValueError("`compare` needs an `sae` block to compare against")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SaeApplied(BaseModel):
    skill: str
    layer: int = Field(description="The block whose output the SAE changed.")
    mode: Literal["steer", "splice"] = "steer"
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
    sae: SaeApplied | None = Field(None, description="The SAE attached, when the request had an `sae` block.")
    unsteered: UnsteeredCompletion | None = Field(None, description="With `compare`: the same request without the SAE.")


# ---------------------------------------------------------------- transparency


class InspectRequest(Strict):
    model: Name = Field(description="Registered model name whose residual stream the skill's SAE reads (same hidden size).")
    prompt: Text = Field(..., min_length=1, description="Text to inspect (tokenized without special tokens, as in training).")
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
    reasoning: bool = Field(False, description="A reasoning feature: fires on the think tags of the system prompt only (paper §5).")
    density: float = Field(description="Fraction of counted corpus tokens where the latent is active (0: dead).")
    mean_activation: float = Field(description="Mean activation where it is active.")
    num_tokens: int = Field(description="Corpus tokens the card was computed over.")
    contexts: list[LatentContextView] = Field(description="Top-activating contexts, strongest first.")


class LatentSummary(BaseModel):
    index: int
    density: float
    mean_activation: float
    max_activation: float = Field(description="Strongest activation among its top contexts.")
    top_tokens: list[str] = Field(description="Its firing tokens in the top contexts, strongest first, distinct.")
    reasoning: bool


class DensityHistogram(BaseModel):
    edges: list[float] = Field(description="log10 density bin edges.")
    counts: list[int]
    dead: int = Field(description="Latents that never fired (not in the bins).")


class LatentList(BaseModel):
    skill: str
    layer: int
    num_latents: int
    num_tokens: int
    live: int
    sort: str
    order: str
    q: str | None = None
    offset: int
    limit: int
    total: int = Field(description="Latents matching `q` (all live latents without it).")
    latents: list[LatentSummary]
    density_histogram: DensityHistogram


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


EvalArm.model_rebuild()
EvalCreate.model_rebuild()
