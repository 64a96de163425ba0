"""Transfer diagnostics (resa_engine.transfer) on tiny-llama with a seeded sparsify SAE, and the transfer
report (resa_engine.transfer_report) from hand-made and compare()-made evaluations."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers_tune import make_skill, random_adapter
from conftest import arithmetic_rows

from resa_engine.data import TriggerDataset, special_token_mask
from resa_engine.evaluate import EvalReport, QuestionResult, compare
from resa_engine.extract.config import ExtractConfig
from resa_engine.extract.metrics import heldout_metrics
from resa_engine.models import load_model
from resa_engine.sae.hooks import capture_residual
from resa_engine.transfer import TransferDiagnostics, content_mask, heldout_chunks, heldout_kl, residual_delta, sae_on_target
from resa_engine.transfer_report import render_chart, to_markdown, transfer_report
from resa_engine.tune import LoraSettings, SpliceObjective, TuneConfig, add_lora, remove_lora

ROWS = arithmetic_rows(40, seed=3)
LAYER = 1

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(registry, session_cache_dir):
    """Our own tiny-llama: these tests wrap it in LoRA and unwrap it again."""
    return load_model(registry.get("tiny-llama"), device="cpu", cache_dir=session_cache_dir)


@pytest.fixture(scope="module")
def sae(tmp_path_factory, session_cache_dir):
    from adapters_store import ArtifactStore

    root = tmp_path_factory.mktemp("transfer-store")
    store = ArtifactStore(f"file://{root / 'store'}", cache_dir=session_cache_dir)
    return make_skill(store, "arith", root / "arith", layers=(LAYER,), rows=ROWS, seed=7).sae(LAYER)


@pytest.fixture(scope="module")
def chunks(llama):
    return heldout_chunks(ROWS[:8], llama.tokenizer, 64, 256)


@pytest.fixture
def random_peft(llama, tmp_path):
    """tiny-llama with a random-B adapter attached through PEFT's own loader; unwrapped afterwards."""
    from peft import PeftModel

    folder = random_adapter(llama, tmp_path / "random", seed=3, scale=0.05)
    peft_model = PeftModel.from_pretrained(llama.model, str(folder))
    try:
        yield peft_model
    finally:
        remove_lora(llama, peft_model)


def test_heldout_chunks_are_capped_and_content_mask_drops_first_and_special_positions(llama, chunks):
    assert chunks.shape == (4, 64) and chunks.dtype == torch.long
    mask = content_mask(chunks, llama.tokenizer)
    assert not mask[:, 0].any()
    assert not (mask & special_token_mask(chunks, llama.tokenizer)).any()
    assert int(mask.sum()) == int((~special_token_mask(chunks[:, 1:], llama.tokenizer)).sum())


def test_sae_on_target_is_stage_one_heldout_metrics_on_the_target(llama, sae, chunks):
    got = sae_on_target(llama, sae, LAYER, chunks)
    data = TriggerDataset(chunks=chunks, chunk_len=64, n_rows=8)
    want = heldout_metrics(llama, {LAYER: sae}, data, ExtractConfig(layers=[LAYER], chunk_len=64, cards=False))[LAYER]
    for key in ("fvu", "loss_recovered", "kl", "l0", "heldout_tokens"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    # FVU by hand: content positions, variance around their mean (a random SAE explains little)
    mask = content_mask(chunks, llama.tokenizer)
    with torch.no_grad(), capture_residual(llama.layers, [LAYER]) as cap:
        llama.model(input_ids=chunks, use_cache=False)
        x = cap[LAYER][mask].double()
        acts, idx, _ = sae.encode(x.float())
        recon = sae.decode(acts, idx).double()
    fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert got["fvu"] == pytest.approx(fvu, rel=1e-4) and got["fvu"] > 0.5
    assert got["heldout_tokens"] == int(mask.sum()) and got["kl"] > 0


def test_residual_delta_is_exactly_zero_for_a_fresh_adapter(llama, chunks):
    peft_model = add_lora(llama, LoraSettings(r=8, alpha=16), seed=0)  # B = 0
    try:
        peft_model.train()
        l2, rel = residual_delta(peft_model, llama.layers, chunks, content_mask(chunks, llama.tokenizer))
        assert peft_model.training  # the caller's mode is restored
    finally:
        remove_lora(llama, peft_model)
    assert set(l2) == set(rel) == set(range(llama.num_layers))
    assert all(v == 0.0 for v in l2.values()) and all(v == 0.0 for v in rel.values())


def test_residual_delta_of_a_random_adapter_matches_hidden_states_by_hand(llama, random_peft, chunks):
    mask = content_mask(chunks, llama.tokenizer)
    l2, rel = residual_delta(random_peft, llama.layers, chunks, mask)
    assert all(l2[i] > 0 and 0 < rel[i] < 10 for i in l2), (l2, rel)
    assert residual_delta(random_peft, llama.layers, chunks, mask) == (l2, rel)  # eval mode: no LoRA dropout
    random_peft.eval()
    with torch.no_grad():
        tuned = random_peft(input_ids=chunks, output_hidden_states=True).hidden_states
        with random_peft.disable_adapter():
            base = random_peft(input_ids=chunks, output_hidden_states=True).hidden_states
    for i in range(llama.num_layers - 1):  # HF's last hidden state is after the final norm; block outputs before it
        d = (tuned[i + 1][mask] - base[i + 1][mask]).norm(dim=-1)
        assert l2[i] == pytest.approx(float(d.mean()), rel=1e-5)
        assert rel[i] == pytest.approx(float((d / base[i + 1][mask].norm(dim=-1)).mean()), rel=1e-5)


def test_heldout_kl_is_the_objective_kl_per_token_in_eval_mode(llama, sae, random_peft, chunks):
    objective = SpliceObjective(random_peft, sae, LAYER)
    random_peft.train()
    got = heldout_kl(objective, chunks)
    assert random_peft.training
    random_peft.eval()
    by_hand = sum(objective.kl(chunks[i : i + 1]) for i in range(len(chunks))) / len(chunks)  # equal-length chunks
    assert got == pytest.approx(by_hand, rel=1e-6) and got > 0


def test_fresh_adapter_kl_is_the_splice_alone(llama, sae, chunks):
    """B = 0: the student is the target with the SAE spliced in, so the KL is KL(clean || spliced) per token."""
    import torch.nn.functional as F

    from resa_engine.sae.splice import splice_sae

    peft_model = add_lora(llama, LoraSettings(r=8, alpha=16), seed=0)
    try:
        got = heldout_kl(SpliceObjective(peft_model, sae, LAYER), chunks)
    finally:
        remove_lora(llama, peft_model)
    with torch.no_grad():
        clean = F.log_softmax(llama.model(input_ids=chunks).logits.float(), dim=-1)
        with splice_sae(llama.layers, LAYER, sae):
            spliced = F.log_softmax(llama.model(input_ids=chunks).logits.float(), dim=-1)
    want = float(F.kl_div(spliced, clean, log_target=True, reduction="sum")) / chunks.numel()
    assert got == pytest.approx(want, rel=1e-5) and got > 0


def test_transfer_diagnostics_to_dict_is_json_safe():
    d = TransferDiagnostics(
        layer=1, target_fvu=float("nan"), target_loss_recovered=None, target_kl_spliced=0.25, kl_heldout_before=0.5,
        kl_heldout_after=float("inf"), residual_delta_l2={1: 0.0, 0: 2.5}, residual_delta_rel={0: 0.1, 1: float("nan")},
        heldout_tokens=256, content_tokens=240,
    )  # fmt: skip
    out = d.to_dict()
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert out["target_fvu"] is None and out["kl_heldout_after"] is None and out["target_loss_recovered"] is None
    assert out["residual_delta_l2"] == {"0": 2.5, "1": 0.0} and out["residual_delta_rel"] == {"0": 0.1, "1": None}
    assert out["layer"] == 1 and out["heldout_tokens"] == 256 and out["content_tokens"] == 240


# ---------------------------------------------------------------- the report

SKILL = {
    "name": "arith", "source": {"model": "smollm2-135m", "adapter": "demo-source"}, "layers": [12], "default_layer": 12, "d_in": 576,
    "sae": {"num_latents": 4608, "k": 32, "expansion_factor": 8}, "metrics": {"12": {"fvu": 0.12, "loss_recovered": 0.95, "kl": 0.2}},
    "tokens_seen": 65536, "wall_s": 72.0, "dataset": {"rows": 1000},
}  # fmt: skip
ADAPTER = {
    "skill": "arith", "target": {"model": "smollm2-135m"}, "layer": 12, "objective": "kl", "splice_grad": False,
    "lora": {"r": 32, "alpha": 128}, "train": {"lr": 1e-5, "steps": 60, "epochs": 1, "batch_size": 1, "chunk_len": 256}, "wall_s": 122.0,
    "transfer": TransferDiagnostics(
        layer=12, target_fvu=0.42, target_loss_recovered=0.8, target_kl_spliced=0.3, kl_heldout_before=0.5, kl_heldout_after=0.2,
        residual_delta_l2={11: 0.0, 12: 0.0, 13: 1.5, 14: 2.5}, residual_delta_rel={11: 0.0, 12: 0.0, 13: 0.02, 14: 0.045},
        heldout_tokens=4096, content_tokens=4000,
    ).to_dict(),
}  # fmt: skip
NO_GAIN = "source gain's 95% interval [-0.010, 0.210] contains 0"
EVALUATION = {
    "arms": {
        "base": {"acc": 0.25, "ci95": [0.158, 0.372], "n": 60},
        "source": {"acc": 0.35, "ci95": [0.242, 0.476], "n": 60, "diff_vs_base": 0.10, "diff_ci95": [-0.01, 0.21], "mcnemar_p": 0.12},
        "skill": {"acc": 0.30, "ci95": [0.2, 0.42], "n": 60, "diff_vs_base": 0.05, "diff_ci95": [-0.02, 0.12], "mcnemar_p": 0.31,
                  "retention": {"value": None, "ci95": None, "defined": False, "reason": NO_GAIN}},
        "random_sae": {"acc": 0.10, "ci95": [0.05, 0.2], "n": 60, "diff_vs_base": -0.15, "diff_ci95": [-0.25, -0.05], "mcnemar_p": 0.004,
                       "retention": {"value": None, "ci95": None, "defined": False, "reason": NO_GAIN}},
        "probe_arm": {"acc": 0.2, "ci95": [0.1, 0.3], "n": 60, "model": "other-model"},
    },
    "protocol": {"samples": 1, "temperature": 0.0, "top_p": 0.95, "max_tokens": 32, "seed": 0, "prompt_format": "resa"},
    "dataset": {"sha256": "a" * 64, "rows": 60, "evaluated": 60},
}  # fmt: skip
STAGES = [
    {"name": "source: SFT LoRA", "wall_s": 290.0, "detail": {"work": "40 steps x 8 rows"}},  # the demo's StageTime shape
    {"name": "evaluate", "wall_s": 221.0, "compute": "4 arms x 60 questions"},
]
SAME = "indistinguishable from no effect at this sample size"


def test_report_verdict_is_computed_from_the_numbers():
    report = transfer_report(SKILL, ADAPTER, EVALUATION, stages=STAGES, source_method="sft")
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    v = report["verdict"]
    assert f"Resa's difference from the base is +0.050 [\u22120.020, +0.120], p = 0.31 (n = 60): {SAME}." in v
    assert f"The source's difference from the base is +0.100 [\u22120.010, +0.210], p = 0.12 (n = 60): {SAME}." in v
    assert "The random-SAE control's difference from the base is \u22120.150 [\u22120.250, \u22120.050], p = 0.004 (n = 60): worse than the base." in v
    assert f"Retention of the source's gain by Resa is undefined: {NO_GAIN}." in v
    assert any(s.startswith("Resa vs the random-SAE control: pass@1 0.300 vs 0.100; without per-question results") for s in v)
    assert ("On the target's own activations at layer 12 the skill's SAE has FVU 0.420 (0.120 on the source) "
            "and recovers 0.800 of the next-token loss (0.950 on the source).") in v
    assert "Held-out KL(base \u2016 student) fell from 0.500 to 0.200 nats per token with tuning (\u221260%)." in v
    assert "The adapter moves the residual stream most at layer 14: mean \u2016\u0394h\u2016 = 2.5, 4.5% of \u2016h\u2016." in v
    assert "Layer(s) 11, 12 are exactly unchanged by the adapter (\u0394h = 0)." in v

    arms = {a["label"]: a for a in report["evaluation"]["arms"]}
    assert list(arms) == ["base", "source", "skill", "random_sae", "probe_arm"]
    assert arms["skill"]["description"] == "Resa: target + adapter from the source's SAE"
    assert arms["random_sae"]["description"] == "random-SAE control: adapter tuned against an untrained SAE of the same shape"
    assert arms["probe_arm"]["description"] == "probe_arm: an arm this report does not describe (model other-model)"
    assert report["skill"]["fvu_source"] == 0.12 and report["adapter"]["lr"] == 1e-5 and report["transfer"]["target_fvu"] == 0.42
    assert report["protocol"]["questions"] == 60 and report["protocol"]["temperature"] == 0.0
    assert report["stages"] == [{"name": "source: SFT LoRA", "wall_s": 290.0, "compute": "40 steps x 8 rows"},
                                {"name": "evaluate", "wall_s": 221.0, "compute": "4 arms x 60 questions"}]  # fmt: skip
    assert report["total_wall_s"] == 511.0 and report["source_method"] == "sft"


def test_report_markdown_has_the_verdict_first_and_the_tables():
    md = to_markdown(transfer_report(SKILL, ADAPTER, EVALUATION, stages=STAGES, source_method="sft"))
    assert md.startswith("# Transfer report: skill `arith` \u2192 `smollm2-135m`")
    sections = ["## Verdict", "## Pass@1 per arm", "## Transfer diagnostics", "## Stages and compute", "## Settings"]
    assert [md.index(h) for h in sections] == sorted(md.index(h) for h in sections)
    assert "| arm | what it is | pass@1 [95% CI] | diff vs base [95% paired CI] | McNemar p | retention | n |" in md
    assert "| `base` | base: the target model alone, no adapter | 0.250 [0.158, 0.372] |  |  |  | 60 |" in md
    assert ("| `skill` | Resa: target + adapter from the source's SAE | 0.300 [0.200, 0.420] | +0.050 [\u22120.020, +0.120] | 0.31 | "
            f"undefined ({NO_GAIN}) | 60 |") in md
    assert ("| `random_sae` | random-SAE control: adapter tuned against an untrained SAE of the same shape | 0.100 [0.050, 0.200] | "
            f"\u22120.150 [\u22120.250, \u22120.050] | 0.004 | undefined ({NO_GAIN}) | 60 |") in md
    assert "| `skill` \u2212 `random_sae` | whether the skill's features matter | 0.300 vs 0.100 | +0.200 (unpaired) |  |" in md
    assert "| FVU of the skill's SAE (content positions) | 0.42 | 0.12 |" in md
    assert "| held-out KL(base \u2016 student), nats per token, after tuning | 0.2 |  |" in md
    assert "| 14 | 2.5 | 0.045 |" in md
    assert "| source: SFT LoRA | 290.0 | 40 steps x 8 rows |" in md and "| total | 511.0 |  |" in md
    assert "| lr | 1e-05 |" in md and "| splice_grad | no |" in md and "| samples | 1 |" in md


def _arm(label: str, correct: list[bool]) -> EvalReport:
    questions = [QuestionResult(f"q{i}", "1", ["1" if c else "0"], [c]) for i, c in enumerate(correct)]
    return EvalReport(label, "m", None, sum(correct), len(correct), questions, {}, 1.5, completion_tokens=10)


def test_report_from_compare_pairs_the_controls_with_resa_and_defines_retention():
    n = 100
    evaluation = compare({
        "base": _arm("base", [False] * n), "source": _arm("source", [i < 40 for i in range(n)]),
        "skill": _arm("skill", [i < 30 for i in range(n)]), "random_sae": _arm("random_sae", [i < 2 for i in range(n)]),
        "sae_kept": _arm("sae_kept", [i < 29 or i == 99 for i in range(n)]),
    })  # fmt: skip
    report = transfer_report(SKILL, {k: v for k, v in ADAPTER.items() if k != "transfer"}, evaluation)
    v = report["verdict"]
    ret = evaluation["arms"]["skill"]["retention"]
    lo, hi = ret["ci95"]
    assert f"Resa keeps 0.75 of the source's gain over the base (95% interval [{lo:.3f}, {hi:.3f}])." in v
    contrasts = {(c["a"], c["b"]): c for c in report["evaluation"]["contrasts"]}
    skill_vs_random = contrasts[("skill", "random_sae")]
    assert skill_vs_random["paired"] and skill_vs_random["diff"] == pytest.approx(0.28) and skill_vs_random["mcnemar_p"] < 1e-6
    matters = "the skill's features matter: Resa beats an adapter tuned against an untrained SAE of the same shape."
    assert any(s.startswith("Resa vs the random-SAE control: +0.280 [") and s.endswith(f"p < 0.001, paired on the same questions: {matters}") for s in v)
    kept = contrasts[("sae_kept", "skill")]
    assert kept["diff"] == pytest.approx(0.0) and kept["mcnemar_p"] == 1.0
    assert any(s.startswith("Resa with the SAE kept vs Resa: +0.000 [") and s.endswith(
        "keeping the SAE at inference makes no measurable difference at this sample size.") for s in v)  # fmt: skip
    assert "The adapter's manifest records no transfer diagnostics." in v
    assert any(s["name"] == "evaluate" and s["compute"] == "5 arms x 100 questions, 50 tokens generated" for s in report["stages"])


def test_report_without_an_evaluation_says_so_and_has_nothing_to_draw(tmp_path):
    report = transfer_report(SKILL, ADAPTER, None)
    assert report["verdict"][0] == "No evaluation of this pair is recorded: the report shows the skill, the adapter and its transfer diagnostics only."
    assert report["evaluation"] is None and [s["name"] for s in report["stages"]] == ["extract skill arith", "tune adapter \u2192 smollm2-135m"]
    assert "## Pass@1 per arm" not in to_markdown(report)
    with pytest.raises(ValueError, match="no evaluation"):
        render_chart(report, tmp_path / "x.png")


def test_render_chart_writes_png_and_svg_with_every_arm_label(tmp_path):
    report = transfer_report(SKILL, ADAPTER, EVALUATION)
    png = render_chart(report, tmp_path / "out" / "transfer.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    svg = render_chart(report, tmp_path / "transfer.svg", fmt="svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    for label in EVALUATION["arms"]:
        assert label in svg, label


# ---------------------------------------------------------------- wired into tune_adapter


@pytest.mark.skipif("heldout_fraction" not in TuneConfig.__dataclass_fields__, reason="tune_adapter does not record transfer diagnostics yet")
def test_tune_adapter_records_transfer_diagnostics_in_the_manifest(llama, tmp_path, session_cache_dir):
    from adapters_store import ArtifactStore

    from resa_engine.tune import tune_adapter

    store = ArtifactStore(f"file://{tmp_path / 'store'}", cache_dir=session_cache_dir)
    skill = make_skill(store, "arith", tmp_path / "arith", layers=(LAYER,), rows=ROWS)
    cfg = TuneConfig(max_steps=5, layer=LAYER, lr=1e-3, chunk_len=64, heldout_max_tokens=256)
    result = tune_adapter(llama, skill, ROWS, cfg, tmp_path / "adapter")
    m = json.loads((result.out_dir / "manifest.json").read_text())
    t = m["transfer"]
    assert t == result.transfer and m["dataset"]["train_rows"] + m["dataset"]["heldout_rows"] == len(ROWS) == m["dataset"]["rows"]
    assert m["dataset"]["heldout_rows"] == 4 and m["train"]["heldout_fraction"] == 0.1
    assert t["layer"] == LAYER and 0 < t["heldout_tokens"] <= 256 and 0 < t["content_tokens"] < t["heldout_tokens"]
    assert t["target_fvu"] > 0 and t["target_kl_spliced"] > 0 and t["kl_heldout_before"] > 0 and t["kl_heldout_after"] != t["kl_heldout_before"]
    # the faithful default trains only the adapters after the splice: blocks <= LAYER are exactly unchanged
    assert [t["residual_delta_l2"][str(i)] == 0.0 for i in range(llama.num_layers)] == [True, True, False, False]
    none = tune_adapter(llama, skill, ROWS, TuneConfig(max_steps=1, layer=LAYER, heldout_fraction=0.0, chunk_len=64), tmp_path / "b")
    assert none.manifest["transfer"] is None and none.manifest["dataset"]["heldout_rows"] == 0


def test_report_of_a_random_sae_control_does_not_credit_the_skills_sae():
    control = {**ADAPTER, "random_sae": True, "transfer": {**ADAPTER["transfer"], "kl_heldout_after": 0.5}}
    v = transfer_report(SKILL, control, None)["verdict"]
    assert "On the target's own activations at layer 12 the untrained control SAE has FVU 0.420 and recovers 0.800 of the next-token loss." in v
    assert "Held-out KL(base \u2016 student) stayed at 0.500 nats per token through tuning." in v
