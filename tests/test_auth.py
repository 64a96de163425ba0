"""API keys and scopes: 401 without or with a wrong key, 403 for the wrong scope, probes open,
development mode (no keys) open and announced loudly."""

from __future__ import annotations

import logging

import pytest

from _helpers_service import start_service

ADMIN, GEN = "adm-0123456789abcdef", "gen-0123456789abcdef"


@pytest.fixture(scope="module")
def secured(tmp_path_factory, models_file, session_cache_dir, redis_server):
    yield from start_service(
        tmp_path_factory.mktemp("auth"),
        models_file,
        session_cache_dir,
        redis_server.url,
        worker=False,
        RESA_API_KEYS=f"{ADMIN}:admin,{GEN}:generate",
        RESA_DEFAULT_MODEL="",
    )


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


SKILL = {"name": "s", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": "a" * 64}

# (method, path, body, status with the generate key, status with the admin key); admin-only routes are 403
# for generate keys; the admin statuses show the request got past auth (404: the named thing does not exist).
ROUTES = [
    ("GET", "/models", None, 200, 200),
    ("GET", "/skills", None, 200, 200),
    ("GET", "/adapters", None, 200, 200),
    ("GET", "/datasets", None, 200, 200),
    ("GET", "/jobs", None, 200, 200),
    ("GET", "/jobs/nope", None, 404, 404),
    ("POST", "/skills", SKILL, 403, 404),
    ("POST", "/skills/s/adapters", {"target": "tiny-llama"}, 403, 404),
    ("DELETE", "/skills/s", None, 403, 404),
    ("DELETE", "/adapters/tiny-llama/s", None, 403, 404),
    ("POST", "/evals", {"model": "tiny-llama", "dataset": "a" * 64}, 404, 404),
    ("POST", "/datasets", {"rows": [{"question": "1+1?", "answer": "2"}]}, 201, 201),
    ("POST", "/generate", {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 2}, 200, 200),
]


@pytest.mark.parametrize("method,path,body,gen_status,admin_status", ROUTES, ids=[f"{m} {p}" for m, p, *_ in ROUTES])
def test_scopes(secured, method, path, body, gen_status, admin_status):
    c = secured.client
    for headers in ({}, bearer("wrong-key"), {"Authorization": f"Basic {ADMIN}"}, {"Authorization": "Bearer "}):
        res = c.request(method, path, json=body, headers=headers)
        assert res.status_code == 401, (headers, res.text)
        assert res.json()["error"]["type"] == "unauthorized" and res.headers["www-authenticate"] == "Bearer"
    res = c.request(method, path, json=body, headers=bearer(GEN))
    assert res.status_code == gen_status, res.text
    if gen_status == 403:
        assert res.json()["error"]["type"] == "forbidden"
    assert c.request(method, path, json=body, headers=bearer(ADMIN)).status_code == admin_status


def test_probes_are_open(secured):
    c = secured.client
    assert c.get("/livez").status_code == 200
    assert c.get("/metrics").status_code == 200
    assert c.get("/readyz").status_code in (200, 503)  # open either way: never 401
    assert c.get("/readyz").status_code != 401


def test_generate_key_cancels_evaluations_but_not_other_jobs(secured):
    jobs = secured.jobs()
    extract = jobs.enqueue("extract", {"name": "x"})
    evaluation = jobs.enqueue("eval", {"model": "tiny-llama", "dataset": "a" * 64})
    c = secured.client
    assert c.delete(f"/jobs/{extract.id}", headers=bearer(GEN)).status_code == 403
    assert c.delete(f"/jobs/{evaluation.id}", headers=bearer(GEN)).status_code == 200
    assert c.delete(f"/jobs/{extract.id}", headers=bearer(ADMIN)).status_code == 200


def test_development_mode_is_open_and_logged(tmp_path, models_file, session_cache_dir, redis_server, caplog):
    with caplog.at_level(logging.WARNING, logger="resa.api"):
        for service in start_service(tmp_path, models_file, session_cache_dir, redis_server.url, worker=False, RESA_DEFAULT_MODEL=""):
            assert service.client.get("/skills").status_code == 200
            assert service.client.delete("/skills/nothing").status_code == 404  # past auth
    assert any("DEVELOPMENT MODE" in r.getMessage() for r in caplog.records)


def test_malformed_key_configuration_is_refused():
    from app.settings import Settings

    with pytest.raises(ValueError, match="key:scope"):
        Settings(api_keys="just-a-key")
    with pytest.raises(ValueError, match="key:scope"):
        Settings(api_keys="k:root")
