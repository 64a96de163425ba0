"""`resa demo`: an end-to-end skill transfer on the bundled model, driven over HTTP.

It starts the service in embedded mode (its own Redis and worker), then acts as a client:
upload data -> train a source (POST /sources: base + a LoRA, by plain SFT by default, our cheap and
clearly labelled stand-in for the paper's RL-tuned sources, or by GRPO on an accuracy reward with
`--source grpo`) -> extract a skill from the source -> build the adapter on the base model -> one
evaluation job (POST /evals) that builds the control adapters it needs and scores every arm on the
same held-out questions: base, source, Resa, Resa with the SAE kept at inference, the random-SAE
control (and, when asked, source = target and the SFT control) -> the transfer report (markdown,
JSON, chart): every arm paired with the base, with intervals, McNemar p-values and a verdict.

Reliability: transient HTTP failures are retried with backoff (DemoClient), a server that
stops under the demo is started again on the same port (DemoServer), and a job lost to a
dying worker is submitted again. The store is workdir/store-<hash of the settings>, so a
second run with the same settings resumes: every stage whose artifact is there (source
adapter, skills, adapters, eval reports) is skipped, and interrupted jobs resume from their
checkpoints. A permanent failure raises DemoError, whose message is one line.

Just over 400 lines: it is the demo's script, stage after stage, read top to bottom; the HTTP
client and the server it drives live in client.py and embedded.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.local.client import RESUBMIT_ERRORS, DemoClient, DemoError, DemoServer, say, submit_job

MODEL = "smollm2-135m"


@dataclass
class DemoConfig:
    train_rows: int = 1000
    """Arithmetic QA rows for the source, extraction and tuning."""
    test_rows: int = 160
    """Held-out rows for evaluation: for a paired interval of about +-0.07 on a difference from the base (5 arms of
    160 questions fit the demo's 20 minutes on a 2-core CPU)."""
    layer: int = 12
    """Hookpoint: output of decoder block `layer` (SmolLM2 has 30)."""
    expansion_factor: int = 8
    """SAE width = 576 * expansion_factor."""
    k: int = 32
    """TopK latents per token."""
    chunk_len: int = 256
    """Tokens per training chunk (the authors use 2048; shorter suits a CPU)."""
    sae_max_tokens: int = 65_536
    """Activation tokens the SAE sees."""
    heldout_tokens: int = 2048
    """Held-out tokens scored per layer after SAE training (FVU, loss recovered)."""
    source_method: str = "sft"
    """How the source LoRA is made: `sft` (the cheap stand-in; the default, it fits the demo's time) or
    `grpo` (the paper's kind: TRL GRPO on an accuracy reward, LoRA r32/alpha128; ~35-60 s a step here)."""
    sft: dict = field(default_factory=lambda: {"max_steps": 40, "batch_size": 8, "lr": 3e-4})
    """POST /sources options of an `sft` source (fields of resa_engine.sources.sft.SFTConfig)."""
    grpo: dict = field(default_factory=lambda: {"steps": 8, "batch_size": 4, "num_generations": 4, "lr": 5e-5, "micro_batch_size": 4})
    """POST /sources options of a `grpo` source (fields of GRPOSourceConfig; its completions are max_tokens long). The
    paper's sources: lr 1e-6 over hundreds of steps. 4 completions per pass keep GRPO's memory near 4.4 GB on a CPU."""
    tune_epochs: int = 1
    """SAE-guided tuning epochs over the training chunks."""
    tune_max_steps: int | None = 60
    """Cap on SAE-guided tuning steps (batch 1)."""
    tune_lr: float = 1e-5
    """SAE-guided tuning lr (the authors use 1e-6 for 1.5B models over far more steps)."""
    tune_heldout_tokens: int = 1024
    """Held-out tokens the transfer diagnostics score (KL before and after tuning, the SAE on the target)."""
    objective: str = "kl"
    """Stage II objective: `kl` (authors' code) or `ce` (paper text)."""
    splice_grad: bool = False
    """Let gradients flow through the frozen SAE to adapters before the hookpoint."""
    samples: int = 1
    """Completions per test question (pass@1 averages them)."""
    temperature: float = 0.0
    """Evaluation temperature (0: greedy, deterministic)."""
    max_tokens: int = 32
    """New tokens per evaluation completion."""
    self_variant: bool = False
    """Also evaluate the `self` control: the transfer repeated with the base model as its own source."""
    sft_control: bool = False
    """Also evaluate the `sft` control: the same LoRA trained on the target with plain SFT on the same rows."""
    seed: int = 0
    """Data, source, SAE and tuning seed."""

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(
            train_rows=200, test_rows=40, chunk_len=128, sae_max_tokens=16_384, heldout_tokens=1024, tune_max_steps=12, tune_heldout_tokens=256,
            max_tokens=24, sft={"max_steps": 8, "batch_size": 4, "lr": 3e-4},
            grpo={"steps": 2, "batch_size": 4, "num_generations": 4, "lr": 5e-5, "micro_batch_size": 4},
        )  # fmt: skip

    def controls(self) -> list[str]:
        """The evaluation's arms by name (POST /evals `controls`)."""
        return ["base", "source", "resa", "sae_kept", "random_sae"] + ["self"] * self.self_variant + ["sft"] * self.sft_control

    def source_options(self) -> dict:
        """POST /sources `options` for the chosen method."""
        if self.source_method == "grpo":
            return {**self.grpo, "max_completion_length": self.max_tokens, "seed": self.seed}
        return {**self.sft, "seed": self.seed}


@dataclass
class StageTime:
    name: str
    wall_s: float
    detail: dict = field(default_factory=dict)


def config_hash(cfg: DemoConfig) -> str:
    """A short, stable id of the settings (every field, and the model): same settings, same store."""
    payload = json.dumps({"model": MODEL, **asdict(cfg)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _reused(detail: dict) -> dict:
    return {**detail, "reused": True, "work": f"reused: {detail.get('work') or 'made by an earlier run'}"}


class _EvalCache:
    """Eval reports of earlier runs with these settings, keyed by the request and the adapters it used."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    @staticmethod
    def key(body: dict, adapters: dict) -> str:
        return hashlib.sha256(json.dumps({"body": body, "adapters": adapters}, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def put(self, key: str, report: dict) -> None:
        self.data[key] = report
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, default=str))
        tmp.replace(self.path)


def run_demo(cfg: DemoConfig, workdir: Path, report_dir: Path) -> dict:
    """Run (or resume) the demo. Its store is workdir/store-<settings hash>: run again with the same
    settings, it reuses what is there (source adapter, skills, adapters, eval reports) and makes the rest."""
    from app.local.embedded import DirBusy, DirLock

    digest = config_hash(cfg)
    store_dir = (workdir / f"store-{digest}").resolve()
    lock = DirLock(workdir / f"store-{digest}.lock", f"demo store {store_dir}", hint="wait for that demo or pass another --workdir")
    try:
        lock.acquire(owner="resa demo")
    except DirBusy as exc:  # the same settings in the same workdir: two runs would build the same artifacts
        raise DemoError(str(exc)) from None
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
        return _run_demo(cfg, workdir, report_dir, store_dir, digest)
    finally:
        lock.release()


SOURCE = "demo-source"
SKILL = "demo-resa"
SOURCE_STAGE = {"sft": "source: SFT LoRA (stand-in for RL)", "grpo": "source: GRPO LoRA (accuracy reward)"}
ARM_KEYS = {"skill": "resa"}
"""Eval arm label -> its key in the summary's `arms` (the rest keep their label)."""


def _run_demo(cfg: DemoConfig, workdir: Path, report_dir: Path, store_dir: Path, digest: str) -> dict:
    from resa_engine.arith import ArithmeticConfig, generate_arithmetic
    from resa_engine.data import rows_to_jsonl

    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    (workdir / f"store-{digest}.json").write_text(json.dumps({"model": MODEL, **asdict(cfg)}, indent=2))  # what the hash stands for
    env = {**os.environ, "RESA_STORE_URL": f"file://{store_dir}", "RESA_DEFAULT_MODEL": MODEL}
    env.pop("RESA_REDIS_URL", None)
    env.pop("RESA_API_KEYS", None)
    times: list[StageTime] = []
    t_all = time.perf_counter()

    train, test = generate_arithmetic(ArithmeticConfig(train_rows=cfg.train_rows, test_rows=cfg.test_rows, seed=cfg.seed))
    server = DemoServer(env, workdir / f"serve-{stamp}.log")
    print(f"[demo] store {store_dir} (settings {digest}); starting `resa serve` on 127.0.0.1:{server.port} "
          f"(embedded Redis + worker); log: {server.log_path}", file=sys.stderr)
    server.start()
    finished = False
    try:
        client = DemoClient(server.url, server=server)
        t = time.perf_counter()
        server.wait_ready()
        times.append(StageTime("service start (model loaded)", time.perf_counter() - t, {"work": "load SmolLM2-135M, start Redis + worker"}))

        ndjson = {"content-type": "application/x-ndjson"}
        train_ds = client.call("POST", "/datasets", content=rows_to_jsonl(train), headers=ndjson)
        test_ds = client.call("POST", "/datasets", content=rows_to_jsonl(test), headers=ndjson)
        print(f"[demo] datasets: train {train_ds['rows']} rows, test {test_ds['rows']} rows", file=sys.stderr)

        source_body = {"model": MODEL, "name": SOURCE, "dataset": train_ds["id"], "method": cfg.source_method, "options": cfg.source_options()}
        times.append(_adapter_stage(client, SOURCE_STAGE[cfg.source_method], SOURCE, "/sources", source_body, _source_detail))

        sae = {"expansion_factor": cfg.expansion_factor, "k": cfg.k}
        extract_train = {"chunk_len": cfg.chunk_len, "max_tokens": cfg.sae_max_tokens, "heldout_max_tokens": cfg.heldout_tokens, "seed": cfg.seed}
        body = {"name": SKILL, "source": {"model": MODEL, "adapter": SOURCE}, "layers": [cfg.layer], "dataset": train_ds["id"], "sae": sae,
                "train": extract_train}  # fmt: skip
        t = time.perf_counter()
        stage = f"extract {SKILL} (layer {cfg.layer})"
        info = client.get_or_none(f"/skills/{SKILL}")
        if info is not None:
            say(f"skip {stage}: skill {SKILL} is already in the store")
            detail = _reused(_job_detail({"result": {"manifest": info["manifest"]}}))
        else:
            done = client.run_job(f"extract {SKILL}", lambda: submit_job(client, "/skills", body))
            detail = _job_detail(done) if done is not None else _reused(_job_detail({"result": {"manifest": client.call("GET", f"/skills/{SKILL}")["manifest"]}}))
        times.append(StageTime(stage, time.perf_counter() - t, detail))

        tune = {"target": MODEL, "dataset": train_ds["id"], "objective": cfg.objective, "splice_grad": cfg.splice_grad, "epochs": cfg.tune_epochs,
                "max_steps": cfg.tune_max_steps, "lr": cfg.tune_lr, "chunk_len": cfg.chunk_len, "seed": cfg.seed,
                "train": {"heldout_max_tokens": cfg.tune_heldout_tokens}}  # fmt: skip
        times.append(_adapter_stage(client, f"tune {SKILL} -> {MODEL}", SKILL, f"/skills/{SKILL}/adapters", tune, _job_detail))

        # One eval job: the control adapters it needs are built first (chained jobs), then every arm is
        # scored on the same questions with the same seeds.
        cache = _EvalCache(workdir / f"store-{digest}-evals.json")
        eval_body = {"model": MODEL, "skill": SKILL, "dataset": test_ds["id"], "source": {"model": MODEL, "adapter": SOURCE},
                     "controls": cfg.controls(), "samples": cfg.samples, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens,
                     "seed": cfg.seed}  # fmt: skip
        report = _evaluate(client, cache, eval_body, times)
        skill_manifest = client.call("GET", f"/skills/{SKILL}")["manifest"]
        adapter_manifest = _adapter(client, SKILL)["manifest"]
        source_manifest = _adapter(client, SOURCE)["manifest"]
        finished = True
    finally:
        server.stop()
        if finished:  # the Redis of a finished run holds nothing the next run needs (it uses another port)
            from app.local.embedded import data_dir_for, remove_data_dir
            from app.settings import Settings

            remove_data_dir(data_dir_for(Settings().cache_dir, "127.0.0.1", server.port))

    summary = _summarise(cfg, report, times, time.perf_counter() - t_all)
    _write_report(summary, report_dir / f"demo-{stamp}", skill_manifest, adapter_manifest, report, source_manifest.get("origin"))
    return summary


def _adapter(client: DemoClient, name: str) -> dict | None:
    have = client.call("GET", "/adapters", params={"skill": name, "target": MODEL})["adapters"]
    return have[0] if have else None


def _adapter_stage(client: DemoClient, stage: str, name: str, path: str, body: dict, describe) -> StageTime:
    """A stage whose artifact is adapter (MODEL, name): skipped when it is in the store, else its job is run."""
    t = time.perf_counter()
    have = _adapter(client, name)
    if have is not None:
        say(f"skip {stage}: adapter {MODEL}/{name} is already in the store")
        return StageTime(stage, time.perf_counter() - t, _reused(describe({"result": {"manifest": have["manifest"]}})))
    done = client.run_job(stage.split(":")[0].split(" (")[0], lambda: submit_job(client, path, body))
    detail = describe(done) if done is not None else _reused(describe({"result": {"manifest": _adapter(client, name)["manifest"]}}))
    return StageTime(stage, time.perf_counter() - t, detail)


def _evaluate(client: DemoClient, cache: _EvalCache, body: dict, times: list[StageTime]) -> dict:
    """The eval report: reused when an earlier run made one with the same request and the same adapters; else
    the eval job is submitted, its control jobs are waited on (a stage each), then the evaluation itself."""

    def used() -> dict:
        names = {SKILL, SOURCE} | {f"{SKILL}.{suffix}" for suffix in ("random-sae", "sft", "self")}
        return {f"{a['target']}/{a['skill']}": a["manifest"] for a in client.call("GET", "/adapters")["adapters"] if a["skill"] in names}

    label = f"eval {' + '.join(body['controls'])}"
    report = cache.get(cache.key(body, used()))
    if report is not None:
        say(f"skip {label}: reusing the report of an earlier run with the same settings and adapters")
        _controls_reused(client, body["controls"], times)
        times.append(StageTime(label, 0.0, _reused(_eval_detail(report))))
        return report
    for attempt in range(1, 4):
        accepted = client.call("POST", "/evals", json=body)
        try:
            for job in accepted.get("control_jobs") or []:
                t = time.perf_counter()
                name = f"control: {job['kind']} {job.get('skill')} -> {MODEL}"
                times.append(StageTime(name, 0.0, _job_detail(client.wait_job(job["id"], name.removeprefix("control: ")))))
                times[-1].wall_s = time.perf_counter() - t
            _controls_reused(client, body["controls"], times)  # those an earlier run built
            t = time.perf_counter()
            done = client.wait_job(accepted["job"]["id"], label)
        except DemoError as exc:  # a job lost to a worker that died or shut down: submit again, it resumes
            if not (exc.job_error in RESUBMIT_ERRORS or (exc.status == 404 and exc.type == "unknown_job")) or attempt == 3:
                raise
            say(f"{label}: a job was interrupted ({exc.job_error or exc.type}); submitting the evaluation again (attempt {attempt + 1})")
            continue
        report = done["result"]
        times.append(StageTime(label, time.perf_counter() - t, _eval_detail(report)))
        cache.put(cache.key(body, used()), report)
        return report
    raise DemoError(f"{label}: the eval job could not be run")


CONTROL_JOBS = {"random_sae": [("tune", f"{SKILL}.random-sae")], "sft": [("tune", f"{SKILL}.sft")],
                "self": [("extract", f"{SKILL}.self"), ("tune", f"{SKILL}.self")]}
"""The jobs that build each control's artifacts (POST /evals queues those the store lacks)."""


def _controls_reused(client: DemoClient, controls: list[str], times: list[StageTime]) -> None:
    """A stage for each control artifact that was already in the store (built by an earlier run)."""
    done = {s.name for s in times}
    for kind, name in (job for c in controls for job in CONTROL_JOBS.get(c, [])):
        stage = f"control: {kind} {name} -> {MODEL}"
        if stage in done:
            continue
        manifest = client.call("GET", f"/skills/{name}")["manifest"] if kind == "extract" else _adapter(client, name)["manifest"]
        say(f"skip {stage}: already in the store")
        times.append(StageTime(stage, 0.0, _reused(_job_detail({"result": {"manifest": manifest}}))))


def _source_detail(job: dict) -> dict:
    manifest = (job.get("result") or {}).get("manifest") or {}
    train = manifest.get("train") or {}
    if manifest.get("origin") == "grpo":
        out = {"work": f"{train.get('steps')} GRPO steps x {train.get('batch_size')} questions x {train.get('num_generations')} completions"}
    else:
        out = {"work": f"{train.get('steps')} SFT steps x {train.get('batch_size')} rows"}
    for key in ("loss_start", "loss_end", "reward_start", "reward_end", "wall_s"):
        if isinstance(manifest.get(key), (int, float)):
            out[key] = round(manifest[key], 4)
    return out


def _job_detail(job: dict) -> dict:
    result = job.get("result") or {}
    manifest = result.get("manifest") or {}
    keep = {k: manifest[k] for k in ("tokens_seen", "wall_s", "kl_start", "kl_end", "default_layer", "resumed") if k in manifest}
    if "metrics" in manifest:
        keep["metrics"] = manifest["metrics"]
    train = manifest.get("train") or {}
    if "tokens_seen" in manifest:
        keep["work"] = f"{manifest['tokens_seen']:,} activation tokens, {manifest.get('sae', {}).get('num_latents', '?')} latents"
    elif "steps" in train:
        keep["work"] = f"{train['steps']} steps x {train['batch_size']} x {train['chunk_len']} tokens"
    return keep


def _eval_detail(report: dict) -> dict:
    arms = report.get("arms") or {}
    tokens = sum(int((report.get(a) or {}).get("completion_tokens") or 0) for a in arms)
    questions = (report.get("dataset") or {}).get("evaluated", 0)
    return {"work": f"{len(arms)} arms x {questions} questions, {tokens:,} tokens generated"}


def _summarise(cfg: DemoConfig, report: dict, times: list[StageTime], total_s: float) -> dict:
    arms = report["arms"]
    evals = {{"skill": SKILL, "self": f"{SKILL}-self"}.get(label, label): {"acc": a["acc"], "ci95": a["ci95"], "n": a["n"]} for label, a in arms.items()}
    paired = {
        ARM_KEYS.get(label, label): {"acc": a["acc"], "diff_vs_base": a.get("diff_vs_base"), "diff_ci95": a.get("diff_ci95"),
                                     "mcnemar_p": a.get("mcnemar_p")}
        for label, a in arms.items()
    }  # fmt: skip

    def retention(label: str) -> tuple[float | None, dict | None]:
        ret = (arms.get(label) or {}).get("retention")
        return (ret.get("value") if ret and ret.get("defined") else None), ret

    out = {
        "config": asdict(cfg),
        "source_method": cfg.source_method,
        "evals": evals,
        "arms": paired,
        "base_acc": arms["base"]["acc"],
        "source_acc": arms["source"]["acc"],
        "resa_acc": arms["skill"]["acc"],
        "retention": retention("skill")[0],
        "retention_detail": retention("skill")[1],
        "stages": [asdict(t) for t in times],
        "stage_wall_s": {t.name: round(t.wall_s, 1) for t in times},
        "stage_work": {t.name: t.detail.get("work", "") for t in times},
        "total_wall_s": round(total_s, 1),
    }
    if "self" in arms:
        out["resa_self_acc"] = arms["self"]["acc"]
        out["retention_self"] = retention("self")[0]
    return out


def format_table(summary: dict) -> str:
    """Every arm against the base, paired on the same questions; then the stages."""
    lines = ["| arm | pass@1 | 95% interval | diff vs base [95% paired CI] | McNemar p |", "| --- | --- | --- | --- | --- |"]
    for key, a in summary["arms"].items():
        lo, hi = summary["evals"][{"resa": SKILL, "self": f"{SKILL}-self"}.get(key, key)]["ci95"]
        diff = "" if a["diff_vs_base"] is None else f"{a['diff_vs_base']:+.3f} [{a['diff_ci95'][0]:+.3f}, {a['diff_ci95'][1]:+.3f}]"
        p = "" if a["mcnemar_p"] is None else f"{a['mcnemar_p']:.3g}"
        lines.append(f"| {key} | {a['acc']:.3f} | [{lo:.3f}, {hi:.3f}] | {diff} | {p} |")
    work = summary.get("stage_work") or {}
    lines += ["", "| stage | wall s | compute |", "| --- | --- | --- |"]
    lines += [f"| {name} | {s:.1f} | {work.get(name, '')} |" for name, s in summary["stage_wall_s"].items()]
    lines.append(f"| total | {summary['total_wall_s']:.1f} | |")
    cfg = summary.get("config") or {}
    if cfg:
        method = cfg.get("source_method", "sft")
        source = f"{cfg[method].get('steps') or cfg[method].get('max_steps')} {method.upper()} steps"
        lines += ["", f"settings: layer {cfg.get('layer')}, objective {cfg.get('objective')}, splice grad {cfg.get('splice_grad')}, "
                      f"tune lr {cfg.get('tune_lr')}, tune steps {cfg.get('tune_max_steps')}, SAE x{cfg.get('expansion_factor')} k {cfg.get('k')} "
                      f"on {cfg.get('sae_max_tokens'):,} tokens, chunk {cfg.get('chunk_len')}, source {source}, {cfg.get('test_rows')} test questions"]  # fmt: skip
    return "\n".join(lines)


def _write_report(summary: dict, stem: Path, skill_manifest: dict, adapter_manifest: dict, evaluation: dict, source_method: str | None) -> None:
    """The transfer report (resa_engine.transfer_report) with the demo's own stages: markdown, chart, JSON."""
    from resa_engine.transfer_report import render_chart, to_markdown, transfer_report

    stages = [{"name": t["name"], "wall_s": t["wall_s"], "compute": t["detail"].get("work", "")} for t in summary["stages"]]
    report = transfer_report(skill_manifest, adapter_manifest, evaluation, stages=stages, source_method=source_method)
    chart = render_chart(report, stem.with_suffix(".png"))
    report["chart"] = chart.name
    stem.with_suffix(".md").write_text(to_markdown(report) + "\n## Demo summary\n\n" + format_table(summary) + "\n")
    summary["verdict"] = report["verdict"]
    summary["report"] = str(stem.with_suffix(".md"))
    stem.with_suffix(".json").write_text(json.dumps({**summary, "transfer_report": report}, indent=2, default=str))
