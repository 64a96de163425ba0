"""Skill transfer you can trust, end to end over HTTP with a real worker: one POST /evals with named controls
builds the control adapters it lacks (random-SAE, SFT, source = target) as chained jobs, then scores every
arm on the same questions and seeds, pairs each with the base, keeps the report beside the adapter, and
GET /skills/{name}/adapters/{target}/report renders it (JSON, markdown, PNG)."""

from __future__ import annotations

import pytest

from _helpers_service import TINY_SAE, TINY_TRAIN, start_service, upload_rows
from conftest import arithmetic_rows

TUNE = {"max_steps": 3, "chunk_len": 32, "lr": 1e-3, "train": {"heldout_fraction": 0.2, "heldout_max_tokens": 128}}
CONTROLS = ["base", "source", "resa", "sae_kept", "random_sae", "sft", "self"]


@pytest.fixture(scope="module")
def svc(tmp_path_factory, models_file, session_cache_dir, redis_server):
    yield from start_service(tmp_path_factory.mktemp("transfer"), models_file, session_cache_dir, redis_server.url)


@pytest.fixture(scope="module")
def transfer(svc):
    """A skill extracted from tiny-llama-b (the source) with its adapter on tiny-llama (the target)."""
    dataset = upload_rows(svc.client, arithmetic_rows(120))
    body = {"name": "arith", "source": {"model": "tiny-llama-b"}, "layers": [1], "dataset": dataset, "sae": TINY_SAE,
            "train": TINY_TRAIN, "adapters_for": ["tiny-llama"], "tune": TUNE}  # fmt: skip
    res = svc.client.post("/skills", json=body)
    assert res.status_code == 202, res.text
    for job in (res.json()["job"], *res.json()["adapter_jobs"]):
        assert svc.wait_job(job["id"], timeout_s=180)["state"] == "finished"
    return dataset, upload_rows(svc.client, arithmetic_rows(12, seed=9))


def test_one_eval_builds_missing_controls_and_pairs_every_arm_with_the_base(svc, transfer):
    train, test = transfer
    manifest = svc.client.get("/adapters", params={"skill": "arith"}).json()["adapters"][0]["manifest"]
    diag = manifest["transfer"]
    assert diag["layer"] == 1 and 0 < diag["target_fvu"] and diag["kl_heldout_before"] >= 0 and set(diag["residual_delta_l2"]) == {"0", "1", "2", "3"}

    body = {"model": "tiny-llama", "skill": "arith", "dataset": test, "controls": CONTROLS, "samples": 2, "temperature": 0.8,
            "max_tokens": 6, "seed": 3}  # fmt: skip
    res = svc.client.post("/evals", json=body)
    assert res.status_code == 202, res.text
    accepted = res.json()
    controls = accepted["control_jobs"]
    # random-SAE, SFT, source = target (its skill extracted from the target, then its adapter)
    assert sorted(j["kind"] for j in controls) == ["extract", "tune", "tune", "tune"]
    assert accepted["job"]["status"] == "deferred" and set(accepted["job"]["depends_on"]) == {j["id"] for j in controls}
    again = svc.client.post("/evals", json=body).json()  # a second request waits on the same builds
    assert {j["id"] for j in again["control_jobs"]} == {j["id"] for j in controls}

    report = svc.wait_job(accepted["job"]["id"], timeout_s=300)
    assert report["state"] == "finished", report
    result = report["result"]
    arms = result["arms"]
    assert set(arms) == {"base", "source", "skill", "sae_kept", "random_sae", "sft", "self"}
    for label, arm in arms.items():
        assert arm["n"] == 24 and 0 <= arm["acc"] <= 1
        if label != "base":
            lo, hi = arm["diff_ci95"]
            assert lo <= arm["diff_vs_base"] <= hi and 0 <= arm["mcnemar_p"] <= 1
            assert arm["diff_vs_base"] == pytest.approx(arm["acc"] - arms["base"]["acc"])
    assert "retention" in arms["skill"] and arms["source"]["model"] == "tiny-llama-b"
    assert arms["sae_kept"]["sae_layer"] == 1 and arms["random_sae"]["adapter"] == "arith.random-sae"
    # the same questions and seeds in every arm: per question, every arm has its two samples
    assert all(len(q[label]["correct"]) == 2 for q in result["questions"] for label in arms)
    adapters = {a["skill"]: a["manifest"] for a in svc.client.get("/adapters", params={"target": "tiny-llama"}).json()["adapters"]}
    assert adapters["arith.random-sae"]["random_sae"] is True and adapters["arith.sft"]["objective"] == "sft"
    assert adapters["arith.self"]["skill_source"]["model"] == "tiny-llama"
    assert adapters["arith.sft"]["train"]["max_steps"] == adapters["arith"]["train"]["max_steps"]  # the same recipe

    md = svc.client.get("/skills/arith/adapters/tiny-llama/report", params={"format": "md"})
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    for label in ("random-SAE", "SFT", "SAE kept"):
        assert label.lower() in md.text.lower(), label
    data = svc.client.get("/skills/arith/adapters/tiny-llama/report").json()
    assert data["report_name"] == result["report_name"] and data["verdict"]
    assert {a["label"] for a in data["evaluation"]["arms"]} == set(arms)
    png = svc.client.get("/skills/arith/adapters/tiny-llama/report", params={"format": "png"})
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"


def test_controls_are_checked_at_submission(svc, transfer):
    _, test = transfer
    for body, status in (
        ({"model": "tiny-llama", "dataset": test, "controls": ["base"]}, 422),  # controls need a skill
        ({"model": "tiny-llama", "skill": "arith", "dataset": test, "controls": ["base", "nope"]}, 422),
        ({"model": "tiny-llama-b", "skill": "arith", "dataset": test, "controls": ["resa", "sft"]}, 409),  # no adapter on that model
        ({"model": "tiny-llama", "skill": "arith", "dataset": test, "arms": [{"label": "base"}]}, 422),  # a reserved label
        ({"model": "tiny-llama", "skill": "arith", "dataset": test, "arms": [{"label": "x", "sae": {"skill": "nope"}}]}, 404),
    ):
        res = svc.client.post("/evals", json=body)
        assert res.status_code == status, (body, res.text)
    assert svc.client.get("/skills/arith/adapters/tiny-llama-b/report").status_code == 404
