"""The HTTP API end to end with tiny real models, a real Redis and a real worker: datasets,
skills (with chained adapter jobs), adapters, evaluations, generation with a skill attached
(native and cross-model), deletion; then errors, limits, a dead Redis, probes, OpenAPI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _helpers_jobs import wait_for
from _helpers_service import TINY_SAE, TINY_TRAIN, start_service, upload_rows, wait_ready
from conftest import arithmetic_rows, free_port

TUNE = {"max_steps": 2, "chunk_len": 32, "lr": 1e-3}


@pytest.fixture(scope="module")
def svc(tmp_path_factory, models_file, session_cache_dir, redis_server):
    yield from start_service(tmp_path_factory.mktemp("api"), models_file, session_cache_dir, redis_server.url)


@pytest.fixture(scope="module")
def dataset(svc):
    return upload_rows(svc.client, arithmetic_rows(200))


@pytest.fixture(scope="module")
def built(svc, dataset):
    """POST /skills with adapters_for: the extract job and its chained tune job, both finished."""
    body = {
        "name": "arith",
        "source": {"model": "tiny-llama"},
        "layers": [1, 2],
        "dataset": dataset,
        "sae": TINY_SAE,
        "train": TINY_TRAIN,
        "adapters_for": ["tiny-llama"],
        "tune": TUNE,
    }
    res = svc.client.post("/skills", json=body)
    assert res.status_code == 202, res.text
    accepted = res.json()
    assert accepted["skill"] == "arith" and accepted["job"]["kind"] == "extract"
    (tune,) = accepted["adapter_jobs"]
    assert tune["kind"] == "tune" and tune["status"] == "deferred" and tune["depends_on"] == [accepted["job"]["id"]]
    # while it is being built: the same name, the same adapter, and deleting it are conflicts;
    # an adapter for a target of another width is refused from the source model's shape
    assert svc.client.post("/skills", json=body).status_code == 409
    assert svc.client.post("/skills/arith/adapters", json={"target": "tiny-llama"}).json()["error"]["type"] == "job_in_progress"
    assert svc.client.delete("/skills/arith").status_code == 409
    assert svc.client.post("/skills/arith/adapters", json={"target": "tiny-qwen"}).status_code == 422
    extract = svc.wait_job(accepted["job"]["id"])
    tuned = svc.wait_job(tune["id"], timeout_s=120)
    return extract, tuned


def test_dataset_upload_forms_give_one_content_addressed_id(svc, dataset):
    rows = arithmetic_rows(200)
    res = svc.client.post("/datasets", json={"rows": [json.loads(r.to_json()) for r in rows]})
    assert res.status_code == 201 and res.json()["id"] == dataset
    assert res.json() == {"id": dataset, "sha256": dataset, "rows": 200, "bytes": res.json()["bytes"]}
    assert svc.client.get(f"/datasets/{dataset}").json()["rows"] == 200
    assert dataset in [d["id"] for d in svc.client.get("/datasets").json()["datasets"]]


def test_extract_then_chained_adapter_then_generate_and_delete(svc, built, dataset):
    extract, tuned = built
    assert extract["state"] == "finished", extract
    assert extract["progress"]["total"] and extract["progress"]["stage"]
    assert extract["result"]["skill"] == "arith"
    assert tuned["state"] == "finished", tuned
    assert tuned["result"]["adapter"] == {"target": "tiny-llama", "skill": "arith"}

    skills = svc.client.get("/skills").json()["skills"]
    assert [s["name"] for s in skills] == ["arith"] and skills[0]["adapters"] == ["tiny-llama"]
    one = svc.client.get("/skills/arith").json()
    assert one["manifest"]["layers"] == [1, 2] and set(one["metrics"]) == {"1", "2"}
    adapters = svc.client.get("/adapters", params={"skill": "arith"}).json()["adapters"]
    assert [(a["target"], a["skill"]) for a in adapters] == [("tiny-llama", "arith")]

    req = {"model": "tiny-llama", "prompt": "What is 2 + 2?", "max_tokens": 8, "seed": 1}
    base = svc.client.post("/generate", json=req)
    assert base.status_code == 200, base.text
    with_skill = svc.client.post("/generate", json={**req, "skill": "arith"}).json()
    assert with_skill["skill"] == "arith" and with_skill["cross_model"] is False and with_skill["model"] == "tiny-llama"
    assert with_skill["usage"]["completion_tokens"] <= 8 and with_skill["finish_reason"] in ("stop", "length")
    # same architecture and shapes, other weights: the adapter attaches across models and says so
    cross = svc.client.post("/generate", json={**req, "model": "tiny-llama-b", "skill": "arith"})
    assert cross.status_code == 200, cross.text
    assert cross.json()["cross_model"] is True and cross.json()["adapter_target"] == "tiny-llama"
    # another width: no adapter of the skill fits
    wrong = svc.client.post("/generate", json={**req, "model": "tiny-qwen", "skill": "arith"})
    assert wrong.status_code == 409 and wrong.json()["error"]["type"] == "incompatible_adapter"
    assert svc.client.post("/generate", json={**req, "skill": "nope"}).status_code == 404

    again = svc.client.post("/skills/arith/adapters", json={"target": "tiny-llama", **TUNE})
    assert again.status_code == 409 and again.json()["error"]["type"] == "name_taken"
    narrow = svc.client.post("/skills/arith/adapters", json={"target": "tiny-qwen"})
    assert narrow.status_code == 422 and "hidden size" in narrow.json()["error"]["message"]

    ev = svc.client.post("/evals", json={"model": "tiny-llama", "skill": "arith", "dataset": dataset, "limit": 2, "max_tokens": 4})
    assert ev.status_code == 202, ev.text
    report = svc.wait_job(ev.json()["job"]["id"])
    assert report["state"] == "finished", report
    assert report["result"]["model"] == "tiny-llama" and report["result"]["dataset"]["evaluated"] == 2

    gone = svc.client.delete("/skills/arith")
    assert gone.status_code == 200 and gone.json()["deleted"] == {"skill": "arith", "adapters": ["tiny-llama"]}
    assert svc.client.get("/skills/arith").status_code == 404
    assert svc.client.get("/adapters").json()["adapters"] == []
    assert svc.client.post("/generate", json={**req, "skill": "arith"}).status_code == 404
    assert svc.client.delete("/skills/arith").status_code == 404


def test_cancel_a_running_extraction_leaves_nothing_visible(svc, dataset):
    body = {
        "name": "endless",
        "source": {"model": "tiny-llama"},
        "layers": [1],
        "dataset": dataset,
        "sae": TINY_SAE,
        "train": {**TINY_TRAIN, "batch_size": 1, "max_tokens": None, "epochs": 50},
    }
    job_id = svc.client.post("/skills", json=body).json()["job"]["id"]

    def training():
        view = svc.client.get(f"/jobs/{job_id}").json()
        assert view["state"] in ("queued", "started"), view
        return view["state"] == "started" and view["progress"]["step"] > 0

    wait_for(training, 90, 0.2, "extraction to report progress")
    res = svc.client.delete(f"/jobs/{job_id}")
    assert res.status_code == 202 and res.json()["cancel_requested"] is True
    view = svc.wait_job(job_id)
    assert view["state"] == "canceled" and view["error"]["message"] == "canceled by request"
    assert svc.client.get("/skills/endless").status_code == 404
    assert not svc.client.app.state.store.exists("skill", ("endless",))


def test_generate_streams_server_sent_events(svc):
    wait_ready(svc.client)
    req = {"prompt": "What is 3 + 4?", "max_tokens": 6, "seed": 3}
    plain = svc.client.post("/generate", json=req).json()
    with svc.client.stream("POST", "/generate", json={**req, "stream": True}) as res:
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in res.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert "".join(e["text"] for e in events) == plain["text"]
    assert events[-1]["done"] is True and events[-1]["usage"] == plain["usage"] and events[-1]["model"] == "tiny-llama"


# ---------------------------------------------------------------- bad input: 4xx in one shape, never a 500

A = "a" * 64  # a well-formed dataset id that does not exist

BAD = [
    ("post", "/skills", {"name": "x"}, 422, "invalid_request"),
    ("post", "/skills", {"name": "../etc", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": A}, 422, "invalid_request"),
    ("post", "/skills", {"name": "x", "source": {"model": "/tmp/model"}, "layers": [1], "dataset": A}, 422, "invalid_request"),
    ("post", "/skills", {"name": "x", "source": {"model": "no-such"}, "layers": [1], "dataset": A}, 404, "unknown_model"),
    ("post", "/skills", {"name": "x", "source": {"model": "tiny-llama"}, "layers": [9], "dataset": A}, 422, "invalid_layer"),
    ("post", "/skills", {"name": "x", "source": {"model": "tiny-llama"}, "layers": [-1], "dataset": A}, 422, "invalid_request"),
    ("post", "/skills", {"name": "x", "source": {"model": "tiny-llama"}, "layers": [1, 1], "dataset": A}, 422, "invalid_request"),
    ("post", "/skills", {"name": "x", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": A}, 404, "unknown_dataset"),
    ("post", "/skills", {"name": "x", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": "nothex"}, 422, "invalid_request"),
    ("post", "/skills", {"name": "x", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": A, "typo": 1}, 422, "invalid_request"),
    ("post", "/skills", {"name": "x", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": A, "sae": {"k": 0}}, 422, "invalid_request"),
    ("post", "/skills", [1, 2, 3], 422, "invalid_request"),
    ("post", "/skills", {"name": "x", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": A, "train": {"bogus_option": 1}}, 422, "invalid_request"),
    ("post", "/skills", {"name": "x", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": A, "train": {"lr": "NaN"}}, 422, "invalid_request"),
    ("post", "/skills", {"name": "x", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": A, "train": {"chunk_len": 4096}}, 422, "invalid_request"),
    ("post", "/skills/nope/adapters", {"target": "tiny-llama"}, 404, "unknown_skill"),
    ("post", "/skills/nope/adapters", {"target": "no-such"}, 404, "unknown_model"),
    ("post", "/skills/nope/adapters", {"target": "tiny-llama", "objective": "mse"}, 422, "invalid_request"),
    ("post", "/evals", {"model": "tiny-llama", "dataset": A}, 404, "unknown_dataset"),
    ("post", "/evals", {"model": "C:\\models\\x", "dataset": A}, 422, "invalid_request"),
    ("post", "/evals", {"model": "tiny-llama", "dataset": A, "samples": 0}, 422, "invalid_request"),
    ("post", "/generate", {"model": "tiny-llama", "max_tokens": 4}, 422, "invalid_request"),
    ("post", "/generate", {"model": "tiny-llama", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 422, "invalid_request"),
    ("post", "/generate", {"model": "no-such", "prompt": "x"}, 404, "unknown_model"),
    ("post", "/generate", {"model": "../../x", "prompt": "x"}, 422, "invalid_request"),
    ("post", "/generate", {"model": "tiny-llama", "prompt": "x", "max_tokens": 0}, 422, "invalid_request"),
    ("post", "/generate", {"model": "tiny-llama", "prompt": "x", "top_p": 0}, 422, "invalid_request"),
    ("post", "/generate", {"model": "tiny-llama", "prompt": "x", "max_tokens": 10**6}, 422, "max_tokens_too_large"),
    ("post", "/generate", {"model": "tiny-llama", "messages": [{"role": "wizard", "content": "x"}]}, 422, "invalid_request"),
    ("post", "/generate", {"model": "tiny-llama", "prompt": ""}, 422, "invalid_request"),
    ("get", "/jobs/not-a-job", None, 404, "unknown_job"),
    ("get", "/jobs/../../etc", None, 404, "not_found"),
    ("get", "/jobs", {"state": "exploded"}, 422, "invalid_request"),
    ("delete", "/jobs/not-a-job", None, 404, "unknown_job"),
    ("get", "/skills/nope", None, 404, "not_found"),
    ("get", "/skills/..", None, 404, "not_found"),
    ("get", "/skills/bad%20name", None, 422, "invalid_name"),
    ("delete", "/skills/nope", None, 404, "unknown_skill"),
    ("delete", "/adapters/tiny-llama/nope", None, 404, "not_found"),
    ("get", "/datasets/" + A, None, 404, "not_found"),
    ("get", "/datasets/short", None, 404, "not_found"),
    ("get", "/nowhere", None, 404, "not_found"),
    ("put", "/skills", None, 405, "method_not_allowed"),
]


@pytest.mark.parametrize("method,path,body,status,kind", BAD, ids=[f"{m} {p} {s}" for m, p, _, s, _ in BAD])
def test_bad_requests_get_4xx_in_one_shape(svc, method, path, body, status, kind):
    if method == "get":
        res = svc.client.get(path, params=body)
    elif body is None:
        res = svc.client.request(method.upper(), path)
    else:
        res = svc.client.request(method.upper(), path, json=body)
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert error["type"] == kind and error["message"] and error["request_id"] == res.headers["x-request-id"]


BAD_DATASETS = [
    (b'{"question": "1+1?", "answer": "2"}\nnot json\n{"answer": "3"}\n', "application/x-ndjson", 422, [2, 3]),
    (b'{"rows": [{"question": "q"}]}', "application/json", 422, [1]),
    (b'{"rows": "nope"}', "application/json", 422, None),
    (b"{not json", "application/json", 422, None),
    (b"   \n", "application/x-ndjson", 422, None),
    (b"\xff\xfe", "application/x-ndjson", 422, None),
    (b"question,answer\n", "text/csv", 415, None),
]


@pytest.mark.parametrize("body,ctype,status,lines", BAD_DATASETS)
def test_bad_datasets_name_their_lines(svc, body, ctype, status, lines):
    res = svc.client.post("/datasets", content=body, headers={"content-type": ctype})
    assert res.status_code == status, res.text
    error = res.json()["error"]
    if lines:
        assert [p["line"] for p in error["problems"]] == lines


def test_duplicate_skill_name_is_a_conflict(svc, dataset, tmp_path):
    store = svc.client.app.state.store
    (tmp_path / "f").write_text("x")
    store.commit("skill", ("taken",), tmp_path, {"layers": [1], "d_in": 64, "default_layer": 1})
    body = {"name": "taken", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": dataset}
    res = svc.client.post("/skills", json=body)
    assert res.status_code == 409 and res.json()["error"]["type"] == "name_taken"
    store.delete("skill", ("taken",))


@pytest.fixture(scope="module")
def limited(tmp_path_factory, models_file, session_cache_dir, redis_server):
    """An app with small limits and no worker."""
    yield from start_service(
        tmp_path_factory.mktemp("limits"),
        models_file,
        session_cache_dir,
        redis_server.url,
        worker=False,
        RESA_MAX_BODY_BYTES="4096",
        RESA_MAX_PROMPT_TOKENS="16",
        RESA_MAX_NEW_TOKENS="8",
    )


def test_limits_answer_413_and_422(limited):
    c = limited.client
    big = b"".join(r.to_json().encode() + b"\n" for r in arithmetic_rows(200))
    res = c.post("/datasets", content=big, headers={"content-type": "application/x-ndjson"})
    assert res.status_code == 413 and res.json()["error"]["type"] == "body_too_large"

    def chunks_of(data: bytes):
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    def chunks():
        return chunks_of(big)

    res = c.post("/datasets", content=chunks(), headers={"content-type": "application/x-ndjson"})  # no Content-Length
    assert res.status_code == 413 and res.json()["error"]["type"] == "body_too_large"
    skill = {"name": "x", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": "a" * 64, "train": {"pad": "x" * 5000}}
    res = c.post("/skills", content=chunks_of(json.dumps(skill).encode()), headers={"content-type": "application/json"})
    assert res.status_code == 413 and res.json()["error"]["type"] == "body_too_large"
    res = c.post("/generate", json={"model": "tiny-llama", "prompt": "What is 12 + 30? " * 10, "max_tokens": 4})
    assert res.status_code == 413 and res.json()["error"]["type"] == "prompt_too_long"
    res = c.post("/generate", json={"model": "tiny-llama", "prompt": "Hi", "max_tokens": 9})
    assert res.status_code == 422 and "limit of 8" in res.json()["error"]["message"]


# ---------------------------------------------------------------- Redis down, probes, metrics, OpenAPI


@pytest.fixture(scope="module")
def dead_redis(tmp_path_factory, models_file, session_cache_dir):
    yield from start_service(
        tmp_path_factory.mktemp("dead"), models_file, session_cache_dir, f"redis://127.0.0.1:{free_port()}/0", worker=False
    )


def test_redis_down_job_routes_503_generation_still_works(dead_redis, svc, dataset):
    c = dead_redis.client
    for method, path, body in [
        ("GET", "/jobs", None),
        ("GET", "/jobs/abc", None),
        ("DELETE", "/jobs/abc", None),
        ("POST", "/skills", {"name": "x", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": dataset}),
        ("POST", "/evals", {"model": "tiny-llama", "dataset": dataset}),
    ]:
        res = c.request(method, path, json=body)
        assert res.status_code in (503, 404), (path, res.text)  # 404: the dataset lives in the other store
        if res.status_code == 503:
            assert res.json()["error"]["type"] == "queue_unavailable"
    assert c.get("/jobs").status_code == 503
    ready = c.get("/readyz")
    assert ready.status_code == 503 and ready.json()["error"]["checks"]["redis"]["ok"] is False
    assert c.get("/livez").json() == {"status": "ok"}
    assert c.get("/skills").status_code == 200
    res = c.post("/generate", json={"model": "tiny-llama", "prompt": "What is 1 + 1?", "max_tokens": 4})
    assert res.status_code == 200 and res.json()["usage"]["completion_tokens"] >= 1
    assert c.get("/metrics").status_code == 200


def test_probes_models_request_ids_and_metrics(svc):
    c = svc.client
    wait_ready(c)
    ready = c.get("/readyz").json()
    assert ready["status"] == "ready" and set(ready["checks"]) == {"redis", "store", "model"}
    models = {m["name"]: m for m in c.get("/models").json()["models"]}
    assert models["tiny-llama"]["loaded"] is True and models["tiny-llama"]["default"] is True
    assert (models["tiny-qwen"]["architecture"], models["tiny-qwen"]["num_layers"], models["tiny-qwen"]["hidden_size"]) == ("qwen2", 4, 96)
    assert all(isinstance(m["loaded"], bool) and m["error"] is None for m in models.values())

    res = c.get("/livez", headers={"X-Request-ID": "trace-123"})
    assert res.headers["x-request-id"] == "trace-123"
    assert len(c.get("/livez", headers={"X-Request-ID": "bad id; drop table"}).headers["x-request-id"]) == 32
    c.get("/skills/nope")
    text = c.get("/metrics").text
    assert 'resa_http_requests_total{method="GET",route="/skills/{name}",status="404"}' in text
    assert "resa_http_request_duration_seconds_bucket" in text
    assert 'resa_queue_depth{queue="' in text and 'resa_jobs{state="finished"}' in text


def test_openapi_file_is_up_to_date():
    from app.openapi_export import OUT, render

    assert OUT.exists(), "run `python -m app.openapi_export`"
    assert json.loads(OUT.read_text()) == json.loads(render()), "openapi/openapi.json is stale: run `python -m app.openapi_export`"


def test_api_process_imports_without_torch():
    code = (
        "import sys\n"
        "from app.settings import Settings\n"
        "from app.main import create_app\n"
        "from app.jobs import JobQueue\n"
        "create_app(Settings(default_model=''), load_default_model=False)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'sparsify') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
