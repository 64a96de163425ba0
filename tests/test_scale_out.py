"""Scale-out as docs/deploy.md describes it, run on this machine from real parts: one redis-server,
one S3-compatible store (moto in server mode), two `resa worker` processes and two `resa serve`
replicas (A and B) on their own ports, each process with its own cache folder as if on its own host.

- two store clients on the one bucket see each other's commits and deletes;
- jobs submitted through both replicas spread over both workers, and each runs exactly once;
- an adapter built through replica A is listed and served by replica B;
- a skill deleted (then rebuilt) or replaced in place through A is never served stale by B,
  neither as an adapter nor as a steering SAE: B answers a deleted skill as A does, and after a
  rebuild or a replace B's greedy and seeded-sampled outputs equal A's and differ from the old ones;
- a worker SIGKILLed mid-job: the job fails with a reason naming the dead worker (not run
  again), while the other worker keeps completing jobs.

One deployment for the module (tiny models, tiny jobs); every process is stopped at teardown.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _helpers_jobs import wait_for
from _helpers_scale import BUCKET, Deployment, wait_gone
from _helpers_service import TINY_SAE, TINY_TRAIN
from conftest import arithmetic_rows

pytestmark = pytest.mark.timeout(600)

TARGET = "tiny-llama"
OTHER_TARGET = "tiny-llama-b"
PROMPT = "What is 12 + 30?"
GREEDY = {"model": TARGET, "prompt": PROMPT, "max_tokens": 16, "temperature": 0.0}
SAMPLED = {"temperature": 1.0, "seed": 1234}
# Adapter versions: learning rates high enough that each version changes a random tiny model's outputs.
TUNE_V1 = {"max_steps": 2, "chunk_len": 32, "lr": 0.02, "seed": 1}
TUNE_V2 = {"max_steps": 2, "chunk_len": 32, "lr": 0.05, "seed": 2}
TUNE_V3 = {"max_steps": 2, "chunk_len": 32, "lr": 0.1, "seed": 3}
STEER = {"edits": [{"latent": 3, "mode": "clamp", "value": 40.0}, {"latent": 17, "mode": "add", "value": 20.0}]}


def extract_body(name: str, dataset: str, *, seed: int = 0, **extra) -> dict:
    return {
        "name": name,
        "source": {"model": TARGET},
        "layers": [1],
        "dataset": dataset,
        "sae": TINY_SAE,
        "train": {**TINY_TRAIN, "seed": seed},
        **extra,
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, models_file):
    dep = Deployment(tmp_path_factory.mktemp("scale-out"), models_file)
    try:
        dep.start()
        yield dep
    finally:
        dep.stop()


@pytest.fixture(scope="module")
def replicas(deployment):
    return deployment.replicas


@pytest.fixture(scope="module")
def dataset(replicas):
    """QA rows uploaded through A (and read back through B)."""
    a, b = replicas
    res = a.post("/datasets", content=jsonl(arithmetic_rows(120, seed=3)), headers={"content-type": "application/x-ndjson"})
    assert res.status_code == 201, res.text
    first = res.json()["id"]
    assert b.get(f"/datasets/{first}").json()["rows"] == 120
    return first


def jsonl(rows) -> str:
    return "".join(r.to_json() + "\n" for r in rows)


@pytest.fixture(scope="module")
def spread(deployment, replicas, dataset):
    """Four jobs submitted alternately through A and B while both workers are idle: extractions of
    sk0 (through A) and sk1 (through B), and an adapter of each (POST /skills/{name}/adapters through
    A for sk0, B for sk1), which wait for their extraction. They are waited for in order; after each
    one finishes, both replicas' GET /skills is recorded."""
    a, b = replicas
    assert deployment.idle_workers() == {w.name for w in deployment.workers}
    for r in replicas:
        assert r.skills() == {}, "the store starts empty"
    submitted = []  # (what, job id)
    for name, via, seed in (("sk0", a, 0), ("sk1", b, 1)):
        res = via.post("/skills", json=extract_body(name, dataset, seed=seed))
        assert res.status_code == 202, res.text
        submitted.append((("skill", name), res.json()["job"]["id"]))
    for name, via in (("sk0", a), ("sk1", b)):
        res = via.post(f"/skills/{name}/adapters", json={"target": TARGET, **TUNE_V1})
        assert res.status_code == 202, res.text
        submitted.append((("adapter", name), res.json()["job"]["id"]))
    views, listings = {}, []
    for what, job_id in submitted:
        views[what] = deployment.wait_job(a, job_id)
        listings.append((set(views), {r.label: r.skills() for r in replicas}))
    return submitted, views, listings


def generate(replica, **body):
    return replica.post("/generate", json={**GREEDY, **body})


def text_of(replica, **body) -> str:
    res = generate(replica, **body)
    assert res.status_code == 200, f"replica {replica.label}: {res.status_code} {res.text}"
    return res.json()["text"]


def signature(replica, **body) -> tuple[str, str]:
    """What a request produces: the greedy text and a seeded sampled text (which reflects the whole
    next-token distribution, so two adapters that share a greedy text still tell apart)."""
    return text_of(replica, **body), text_of(replica, **body, **SAMPLED)


# ---------------------------------------------------------------- 0. the shared store itself


def test_two_store_clients_see_each_others_commits_and_deletes(deployment, tmp_path):
    """Two ArtifactStores on one bucket, as two hosts have: listings and existence checks follow the
    other's commits and deletes (no cached listing of a store that other processes change)."""
    from adapters_store import ArtifactNotFound, ArtifactStore

    options = {"client_kwargs": {"endpoint_url": deployment.moto.url}, "key": "testing", "secret": "testing"}
    one, two = (
        ArtifactStore(f"s3://{BUCKET}/clients", cache_dir=tmp_path / name, storage_options={**options, "skip_instance_cache": True})
        for name in ("one", "two")
    )
    assert one.fs is not two.fs

    def artifact(name: str) -> Path:
        folder = tmp_path / "src" / name / "sae" / "layers.0"
        folder.mkdir(parents=True)
        (folder / "sae.safetensors").write_bytes(name.encode())
        return tmp_path / "src" / name

    one.commit("skill", ("x",), artifact("x"), {"name": "x"})
    assert [m["key"] for m in two.list("skill")] == [["x"]] and two.exists("skill", ("x",))
    one.commit("skill", ("y",), artifact("y"), {"name": "y"})
    assert [m["key"] for m in two.list("skill")] == [["x"], ["y"]]
    one.delete("skill", ("x",))
    assert not two.exists("skill", ("x",)) and [m["key"] for m in two.list("skill")] == [["y"]]
    with pytest.raises(ArtifactNotFound):
        two.fetch("skill", ("x",))
    first = one.put_dataset(b'{"answer":"1","question":"q"}\n', rows=1)
    assert [d.id for d in two.list_datasets()] == [first.id]
    second = one.put_dataset(b'{"answer":"2","question":"r"}\n', rows=1)
    assert sorted(d.id for d in two.list_datasets()) == sorted([first.id, second.id]) and two.has_dataset(second.id)


# ---------------------------------------------------------------- 1. jobs spread, none runs twice


def test_jobs_spread_over_both_workers_and_none_runs_twice(deployment, replicas, spread):
    submitted, views, listings = spread
    a, b = replicas
    names = {w.name for w in deployment.workers}
    for (kind, name), job_id in submitted:
        view = views[(kind, name)]
        assert view["state"] == "finished", (view, deployment.logs())
        assert view["worker"] in names, view
        # exactly one execution: one RQ result record, one "started" line over both workers' logs,
        # and the committed artifact names this job as the one that built it
        record = deployment.rq_job(job_id)
        assert len(record.results()) == 1, [r.type for r in record.results()]
        starts = deployment.starts_of(job_id)
        assert sum(starts.values()) == 1 and starts[view["worker"]] == 1, starts
        if kind == "skill":
            assert view["result"]["skill"] == name
            manifest = b.get(f"/skills/{name}").json()["manifest"]
        else:
            assert view["result"]["adapter"] == {"target": TARGET, "skill": name}
            (adapter,) = a.get("/adapters", params={"skill": name}).json()["adapters"]
            manifest = adapter["manifest"]
        assert manifest["job_id"] == job_id
    assert {v["worker"] for v in views.values()} == names, {k: v["worker"] for k, v in views.items()}
    # every replica lists every artifact as soon as its job has finished (no stale view of the shared store)
    for finished, seen in listings:
        for label, listed in seen.items():
            for kind, name in finished:
                assert name in listed, f"replica {label} lists {listed} after {sorted(finished)} finished"
                if kind == "adapter":
                    assert listed[name] == [TARGET], f"replica {label} lists {listed} after {sorted(finished)} finished"


# ---------------------------------------------------------------- 2. built through A, served by B


def test_adapter_built_through_one_replica_is_served_by_the_other(deployment, replicas, dataset, spread):
    a, b = replicas
    _, views, _ = spread
    # datasets: each one uploaded through A is listed by B (which has listed the store before)
    assert dataset in [d["id"] for d in b.get("/datasets").json()["datasets"]]
    res = a.post("/datasets", content=jsonl(arithmetic_rows(40, seed=4)), headers={"content-type": "application/x-ndjson"})
    assert res.status_code == 201, res.text
    listed = [d["id"] for d in b.get("/datasets").json()["datasets"]]
    assert {dataset, res.json()["id"]} <= set(listed), f"replica B lists {listed}, not the dataset uploaded through A"
    # skills and adapters
    assert b.skills()["sk0"] == [TARGET]
    assert f"{TARGET}:sk0" in b.model_ids()
    listed = b.get("/adapters", params={"skill": "sk0"}).json()["adapters"]
    assert [(x["target"], x["skill"]) for x in listed] == [(TARGET, "sk0")]
    assert listed[0]["manifest"]["job_id"] == views[("adapter", "sk0")]["id"]

    res = generate(b, skill="sk0")
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["skill"] == "sk0" and body["adapter_target"] == TARGET and body["cross_model"] is False
    assert body["usage"]["completion_tokens"] >= 1
    # B's OpenAI-compatible route serves it too, and A (which built it) produces the same text
    chat = b.post("/v1/completions", json={"model": f"{TARGET}:sk0", "prompt": PROMPT, "max_tokens": 16, "temperature": 0})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["text"] == body["text"]
    assert signature(a, skill="sk0") == signature(b, skill="sk0")


# ---------------------------------------------------------------- 3. deleted or replaced: never stale


def _submit(replica, body: dict) -> list[str]:
    """POST /skills; the ids of its extraction job and its chained adapter jobs."""
    res = replica.post("/skills", json=body)
    assert res.status_code == 202, res.text
    accepted = res.json()
    return [job["id"] for job in (accepted["job"], *accepted["adapter_jobs"])]


def _outputs(replica, skill: str) -> tuple:
    """The replica's outputs with the skill's adapter and with its SAE steering."""
    return signature(replica, skill=skill), signature(replica, sae={"skill": skill, **STEER})


def test_deleted_or_replaced_skill_is_never_served_stale_by_the_other_replica(deployment, replicas, dataset, spread):
    """sk1 is deleted then rebuilt with other settings, sk0 replaced in place (replace: true), both
    through A, while B holds their old adapters and SAEs in its caches."""
    a, b = replicas
    base = signature(b)
    before = {skill: _outputs(b, skill) for skill in ("sk0", "sk1")}
    for skill, (adapted, steered) in before.items():
        assert _outputs(a, skill) == (adapted, steered), f"A and B disagree on {skill} before any change"
        assert adapted != base and steered != base, f"{skill}'s adapter and steering must change the outputs, or nothing below is proved"

    # deleted through A: B answers like A, at once, never from its cached adapter or SAE
    res = a.delete("/skills/sk1")
    assert res.status_code == 200 and res.json()["deleted"] == {"skill": "sk1", "adapters": [TARGET]}, res.text
    for body in ({"skill": "sk1"}, {"sae": {"skill": "sk1", **STEER}}):
        on_a, on_b = generate(a, **body), generate(b, **body)
        assert on_b.status_code in (404, 409), on_b.text
        assert (on_b.status_code, on_b.json()["error"]["type"]) == (on_a.status_code, on_a.json()["error"]["type"]), (on_a.text, on_b.text)
    assert b.get("/skills/sk1").status_code == 404
    assert "sk1" not in b.skills()
    assert f"{TARGET}:sk1" not in b.model_ids()
    assert b.get("/adapters", params={"skill": "sk1"}).json()["adapters"] == []

    # through A: sk1 rebuilt with another SAE seed and adapter settings; sk0 replaced in place, skill
    # and adapter (the two chains run side by side on the two workers)
    jobs = _submit(a, extract_body("sk1", dataset, seed=11, adapters_for=[TARGET], tune=TUNE_V2))
    jobs += _submit(a, extract_body("sk0", dataset, seed=22, replace=True, adapters_for=[TARGET], tune={**TUNE_V3, "replace": True}))
    for job_id in jobs:
        view = deployment.wait_job(a, job_id)
        assert view["state"] == "finished", (view, deployment.logs())

    # B's next requests use the new adapters and SAEs: the same outputs as A's, not the old ones
    for skill, (adapted, steered) in before.items():
        now_adapted, now_steered = _outputs(b, skill)
        assert _outputs(a, skill) == (now_adapted, now_steered), f"A and B disagree on the new {skill}"
        assert now_adapted != adapted, f"B serves {skill}'s old adapter: {adapted!r}"
        assert now_steered != steered, f"B steers with {skill}'s old SAE: {steered!r}"
        assert b.skills()[skill] == [TARGET]
    (sk0_adapter,) = b.get("/adapters", params={"skill": "sk0"}).json()["adapters"]
    assert sk0_adapter["manifest"]["job_id"] == jobs[-1]


# ---------------------------------------------------------------- 4. a worker killed mid-job


def test_killing_a_worker_mid_job_fails_it_with_the_reason_while_the_other_keeps_working(deployment, replicas, dataset, spread):
    a, b = replicas
    # a tuning run far longer than the test: it is running when its worker dies
    long_tune = {"target": OTHER_TARGET, "chunk_len": 32, "batch_size": 1, "epochs": 1000, "lr": 1e-3}
    res = a.post("/skills/sk0/adapters", json=long_tune)
    assert res.status_code == 202, res.text
    job_id = res.json()["job"]["id"]

    def running(job: str, replica, steps: int = 0):
        def check():
            view = replica.get(f"/jobs/{job}").json()
            assert view["state"] in ("queued", "started"), view
            return view if view["state"] == "started" and view["progress"]["step"] >= steps else None

        return check

    view = wait_for(running(job_id, a, steps=1), 150, 0.3, "the long tuning job to run its first steps")
    victim = next(w for w in deployment.workers if w.name == view["worker"])
    survivor = next(w for w in deployment.workers if w is not victim)
    horse = int(deployment.rq_job(job_id).meta["process"]["pid"])
    deployment.track(horse)
    # the other worker is busy too when the first one dies
    other = b.post("/skills", json=extract_body("sk-meanwhile", dataset, seed=5))
    assert other.status_code == 202, other.text
    other_id = other.json()["job"]["id"]
    assert wait_for(running(other_id, b), 150, 0.3, "the other job to start")["worker"] == survivor.name

    victim.kill()
    # until supervision notices, the dead worker's job still holds its adapter's name
    busy = b.delete(f"/adapters/{OTHER_TARGET}/sk0")
    assert busy.status_code == 409 and busy.json()["error"]["type"] == "job_in_progress", busy.text

    failed = deployment.wait_job(b, job_id, timeout_s=120)
    assert failed["state"] == "failed", failed
    assert failed["error"]["type"] == "worker_died", failed
    assert failed["error"].get("worker") == victim.name and "worker died" in failed["error"]["message"], failed
    wait_gone(horse, 30)  # the dead worker's job process ended too: nothing keeps training unseen
    # the failed job released the name and committed nothing
    free = b.delete(f"/adapters/{OTHER_TARGET}/sk0")
    assert free.status_code == 404, free.text
    assert b.get("/adapters", params={"target": OTHER_TARGET}).json()["adapters"] == []

    done = deployment.wait_job(b, other_id)
    assert done["state"] == "finished" and done["worker"] == survivor.name, done
    assert "sk-meanwhile" in a.skills()
    # the killed job ran once and was not picked up again by the survivor
    assert deployment.starts_of(job_id) == {victim.name: 1, survivor.name: 0}
    assert survivor.alive and deployment.idle_workers() == {survivor.name}
