"""Hostile input against a running server (uvicorn on loopback, tiny-llama, a real adapter and SAE):
each offending request fails alone with a 4xx naming the field, never a 500, and the innocent
requests decoding beside it finish with exactly the tokens they get alone."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from _helpers_jobs import wait_for
from _helpers_sae import lens_skill_folder
from _helpers_service import UvicornThread
from _helpers_serving import make_lora
from conftest import free_port

SKILL, LENS = "quirk", "lens"
PROMPT = "What is 2 + 3?"
ADMIN, USER = "admin-key-0123456789", "user-key-0123456789"





@pytest.fixture(scope="module")
def server(tmp_path_factory, models_file, session_cache_dir, tiny_llama_dir):
    from app.main import create_app
    from app.settings import Settings

    tmp = tmp_path_factory.mktemp("hostile")
    settings = Settings(
        store_url=f"file://{tmp / 'store'}", models_file=models_file, cache_dir=session_cache_dir, default_model="tiny-llama",
        redis_url=None, api_keys=f"{ADMIN}:admin,{USER}:generate", device="cpu", max_prompt_tokens=256, max_new_tokens=512,
        datasets_max_bytes=3000,
    )  # fmt: skip
    store = settings.open_store()
    store.commit("adapter", ("tiny-llama", SKILL), make_lora(tiny_llama_dir, tmp / "lora", seed=7), {"skill": SKILL})
    store.commit("skill", (LENS,), lens_skill_folder(tmp / "lens"), {"name": LENS, "layers": [1], "default_layer": 1, "d_in": 64})
    store.commit("skill", ("broken",), lens_skill_folder(tmp / "broken"), {"name": "broken", "layers": [1], "default_layer": 1, "d_in": 64})
    (tmp / "store" / "skills" / "broken" / "manifest.json").write_text("[]")  # valid JSON, wrong shape
    srv = UvicornThread(create_app(settings, load_default_model=False, supervise=False), free_port()).start()
    srv.store = store
    try:
        yield srv
    finally:
        srv.stop()


def _auth(key: str = ADMIN) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _post(server, path: str, body, key: str = ADMIN, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=_auth(key), timeout=120, **kw)


INNOCENT = [
    ("/v1/completions", {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}),
    ("/v1/completions", {"model": f"tiny-llama:{SKILL}", "prompt": "Hello there", "max_tokens": 24, "temperature": 0}),
    ("/generate", {"model": "tiny-llama", "prompt": "What is 7 * 6?", "max_tokens": 24, "sae": {"skill": LENS, "edits": [{"latent": 3, "mode": "clamp", "value": 25.0}]}}),
    ("/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "temperature": 1.0, "seed": 5}),
]


def _text(path: str, res: httpx.Response) -> str:
    assert res.status_code == 200, res.text
    data = res.json()
    if path == "/generate":
        return data["text"]
    choice = data["choices"][0]
    return choice.get("text") if "text" in choice else choice["message"]["content"]


HOSTILE = [
    # (path, body, status, where the reason points)
    ("/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": 3, "temperature": 1, "seed": 18446744073709551616}, 422, "seed"),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": 3, "seed": 2**63}, 422, "seed"),
    ("/generate", {"prompt": "x", "max_tokens": 3, "sae": {"skill": LENS, "edits": [{"latent": 3, "mode": "add", "value": 1e300}]}}, 422, "value"),
    ("/generate", {"prompt": "x", "max_tokens": 3, "sae": {"skill": LENS, "edits": [{"latent": 3, "mode": "clamp", "value": -1e30}]}}, 422, "value"),
    ("/generate", {"prompt": "x", "max_tokens": 3, "top_p": 1e-400}, 422, "top_p"),
    ("/generate", {"prompt": "\ud800 lone", "max_tokens": 3}, 422, "prompt"),
    ("/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "user", "content": "a\udfffb"}], "max_tokens": 3}, 422, "content"),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "x", "stop": ["\ud83d"], "max_tokens": 3}, 422, "stop"),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": 3, "stop": [f"s{i}" for i in range(17)]}, 422, "stop"),
    ("/generate", {"prompt": "x", "max_tokens": 3, "stop": [f"s{i}" for i in range(17)]}, 422, "stop"),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": 3, "stop": ["y" * 300]}, 422, "stop"),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "x" * 2_000_000, "max_tokens": 3}, 413, "characters"),
    ("/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": 10**6}, 422, "max_tokens"),
    ("/datasets", {"rows": [{"question": "\ud800?", "answer": "1"}]}, 422, "surrogate"),
]


def _deep(depth: int) -> bytes:
    return b'{"rows": ' + b"[" * depth + b"]" * depth + b"}"


def test_offending_requests_fail_alone_with_a_4xx_and_innocents_keep_their_tokens(server):
    alone = {i: _text(path, _post(server, path, body)) for i, (path, body) in enumerate(INNOCENT)}
    results: dict = {}

    def innocent(i: int, path: str, body: dict) -> None:
        time.sleep(0.05 * i)
        results[i] = _text(path, _post(server, path, body))

    threads = [threading.Thread(target=innocent, args=(i, p, b)) for i, (p, b) in enumerate(INNOCENT * 2)]
    for t in threads:
        t.start()
    offenders = []
    for path, body, status, where in HOSTILE:  # sent while the innocents decode
        res = httpx.post(server.url + path, content=json.dumps(body).encode(), headers={**_auth(), "content-type": "application/json"}, timeout=60)
        offenders.append((path, res.status_code, res.text))
        assert res.status_code == status, (path, body if len(str(body)) < 300 else "...", res.text[:300])
        assert where in res.text, res.text[:300]
    res = httpx.post(server.url + "/datasets", content=_deep(3000), headers={**_auth(), "content-type": "application/json"}, timeout=60)
    assert res.status_code == 422 and "nested too deeply" in res.text
    for t in threads:
        t.join(120)
    assert {i % len(INNOCENT): text for i, text in results.items()} == alone  # every innocent, both rounds, as alone
    assert len(results) == 2 * len(INNOCENT)


def test_a_tiny_temperature_decodes_greedily_instead_of_overflowing(server):
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 12}
    greedy = _text("/v1/completions", _post(server, "/v1/completions", {**body, "temperature": 0}))
    assert _text("/v1/completions", _post(server, "/v1/completions", {**body, "temperature": 5e-324})) == greedy


def test_metrics_labels_come_from_a_fixed_set(server):
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"X" * 4000 + b" /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        s.recv(4096)
    httpx.request("PROPFIND", server.url + "/skills", headers=_auth(), timeout=10)
    body = httpx.get(server.url + "/metrics", timeout=10).text
    assert "X" * 100 not in body and "PROPFIND" not in body
    assert 'method="OTHER"' in body and len(body) < 60_000


def test_probes_answer_head_and_need_no_key(server):
    for path in ("/livez", "/readyz"):
        res = httpx.head(server.url + path, timeout=10)
        assert res.status_code in (200, 503) and res.content == b""
    assert httpx.head(server.url + "/livez", timeout=10).status_code == 200


def test_an_unauthenticated_bad_body_is_a_401_not_a_parse_error(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        res = httpx.post(server.url + "/generate", content=b"{not json", headers={**headers, "content-type": "application/json"}, timeout=10)
        assert res.status_code == 401 and res.json()["error"]["type"] == "unauthorized", res.text
    res = httpx.post(server.url + "/generate", content=b"{not json", headers={**_auth(USER), "content-type": "application/json"}, timeout=10)
    assert res.status_code == 422


def test_a_dropped_non_streaming_request_is_cancelled_and_not_a_server_error(server):
    engine = server.app.state.generation.models.get("tiny-llama").engine
    for path, body in (
        ("/v1/completions", {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 480, "temperature": 1.0, "seed": 1}),
        ("/generate", {"prompt": PROMPT, "max_tokens": 480, "temperature": 1.0, "seed": 1}),
    ):
        before = engine.stats().cancelled
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + path, json=body, headers=_auth(), timeout=httpx.Timeout(10, read=0.3))
        wait_for(lambda: engine.stats().cancelled > before, 60, 0.1, f"{path}: the dropped request to be cancelled")
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'status="500"' not in metrics and 'status="499"' in metrics


def test_a_manifest_of_the_wrong_shape_is_a_409_for_that_skill_only(server):
    listed = httpx.get(server.url + "/skills", headers=_auth(), timeout=10)
    assert listed.status_code == 200 and {s["name"] for s in listed.json()["skills"]} == {LENS}
    for method, path, body in (
        ("GET", "/skills/broken", None),
        ("GET", "/skills/broken/report", None),
        ("GET", "/skills/broken/latents/1", None),
        ("POST", "/generate", {"prompt": "x", "max_tokens": 2, "sae": {"skill": "broken"}}),
    ):
        res = httpx.request(method, server.url + path, json=body, headers=_auth(), timeout=30)
        assert res.status_code == 409 and res.json()["error"]["type"] == "artifact_corrupt", (path, res.text)


def test_datasets_need_room_in_the_budget_and_admins_delete_them(server):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(20)]
    first = _post(server, "/datasets", {"rows": rows}, key=USER)
    assert first.status_code == 201, first.text
    again = _post(server, "/datasets", {"rows": rows * 3 + [{"question": "Q?", "answer": "1"}]}, key=USER)
    assert again.status_code == 413 and again.json()["error"]["type"] == "datasets_budget_exceeded"
    dataset = first.json()["id"]
    assert httpx.delete(f"{server.url}/datasets/{dataset}", headers=_auth(USER), timeout=10).status_code == 403
    assert httpx.delete(f"{server.url}/datasets/{dataset}", headers=_auth(ADMIN), timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/datasets/{dataset}", headers=_auth(), timeout=10).status_code == 404
    assert _post(server, "/datasets", {"rows": rows * 3 + [{"question": "Q?", "answer": "1"}]}, key=USER).status_code == 201


# ---------------------------------------------------------------- a hostile-input generator against a batch under load

FUZZ_REQUESTS = 360
HOSTILE_VALUES = [
    1e300, -1e300, 5e-324, -5e-324, 1e-300, 2**63, 2**64, -(2**63) - 1, 10**400, -1, 0, 1.5, True, None, "", [], {},
    "\ud800", "a\udfffb", "\x00", "x" * 100_000, "\u202e\u0627", [[[[[[[[[[]]]]]]]]]], {"$ref": "#"}, ["\ud83d"] * 3,
]  # fmt: skip
"""Huge and tiny numbers, integers past 64 bits, wrong types, lone surrogates, NULs, long strings, nesting."""
RAW_NUMBERS = ("NaN", "Infinity", "-Infinity", "1e999", "-0")
"""Not JSON numbers Python's json accepts: sent as raw bytes in place of a value."""
TEMPLATES = [
    ("/generate", {"prompt": PROMPT, "max_tokens": 4, "temperature": 1.0, "top_p": 0.9, "seed": 3, "stop": ["\n\n"],
                   "sae": {"skill": LENS, "layer": 1, "edits": [{"latent": 3, "mode": "add", "value": 2.0}]}}),
    ("/v1/completions", {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 1,
                         "logprobs": 2, "echo": False, "n": 1, "stop": ["\n"]}),
    ("/v1/chat/completions", {"model": f"tiny-llama:{SKILL}", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4,
                              "temperature": 0.5, "seed": 2, "logprobs": True, "top_logprobs": 2}),
    ("/datasets", {"rows": [{"question": "What is 1 + 1?", "answer": "2"}]}),
]  # fmt: skip


def _paths(value, prefix=()):
    """Every (path, leaf) in a JSON value: the places a hostile value can go."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))
    yield prefix, value


def _replace(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(copy[path[0]], path[1:], new)
    return copy


def hostile_requests(seed: int, count: int):
    """(method, path, body bytes): a valid request with one or two of its values swapped for a hostile one."""
    import random

    rnd = random.Random(seed)
    for i in range(count):
        path, body = TEMPLATES[i % len(TEMPLATES)]
        for _ in range(rnd.choice((1, 1, 2))):
            places = [p for p, _ in _paths(body) if p]
            body = _replace(body, rnd.choice(places), rnd.choice(HOSTILE_VALUES))
        raw = json.dumps(body).encode()
        if rnd.random() < 0.1:  # a raw non-JSON number in place of the first numeric value
            raw = raw.replace(b": 4", b": " + rnd.choice(RAW_NUMBERS).encode(), 1)
        if rnd.random() < 0.03:
            raw = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        yield "POST", path, raw


def _raw_http(server, request: bytes) -> int:
    """Status of a request written byte for byte (methods httpx would refuse to send)."""
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(request)
        head = s.recv(4096).split(b"\r\n", 1)[0].split()
    return int(head[1]) if len(head) > 1 else 0


def test_hostile_fuzz_under_load_no_5xx_and_no_innocent_harmed(server, request):
    alone = {i: _text(path, _post(server, path, body)) for i, (path, body) in enumerate(INNOCENT)}
    harmed, innocent_done, stop = [], [0], threading.Event()

    def innocents(k: int) -> None:
        while not stop.is_set():
            for i, (path, body) in enumerate(INNOCENT):
                res = _post(server, path, body)
                if res.status_code != 200 or _text(path, res) != alone[i]:
                    harmed.append((path, res.status_code, res.text[:200]))
                innocent_done[0] += 1

    load = [threading.Thread(target=innocents, args=(k,)) for k in range(3)]
    for t in load:
        t.start()
    by_class, server_errors = {2: 0, 4: 0, 5: 0}, []
    try:
        for method, path, raw in hostile_requests(seed=17, count=FUZZ_REQUESTS):
            res = httpx.request(method, server.url + path, content=raw, headers={**_auth(), "content-type": "application/json"}, timeout=120)
            by_class[res.status_code // 100] = by_class.get(res.status_code // 100, 0) + 1
            if res.status_code >= 500:
                server_errors.append((path, raw[:200], res.text[:300]))
        for raw in (b"X" * 4000 + b" /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    b"PROPFIND /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\nConnection: close\r\n\r\n"):  # fmt: skip
            status = _raw_http(server, raw)
            by_class[status // 100] = by_class.get(status // 100, 0) + 1
            if status >= 500 or status == 0:
                server_errors.append(("raw", raw[:60], status))
    finally:
        stop.set()
        for t in load:
            t.join(180)
    table = [
        "hostile fuzz under load | requests | 2xx | 4xx | 5xx | innocent requests | innocents harmed",
        f"seed 17                 | {sum(by_class.values())} | {by_class[2]} | {by_class[4]} | {by_class[5]} | {innocent_done[0]} | {len(harmed)}",
    ]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for line in table:
        print(line)
        if reporter is not None:
            reporter.write_line(line)
    assert not server_errors, server_errors[:5]
    assert not harmed, harmed[:5]
    assert by_class[4] > FUZZ_REQUESTS // 2 and innocent_done[0] >= len(INNOCENT)
