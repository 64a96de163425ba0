"""The artifact store over real files and a real S3-compatible server (moto in server mode)."""

import json
import threading

import pytest

from adapters_store import (
    MANIFEST,
    ArtifactConflict,
    ArtifactNotFound,
    ArtifactStore,
    ChecksumMismatch,
    InvalidName,
    Staging,
    StoreError,
)


def make_artifact(folder, payload=b"weights"):
    (folder / "sae" / "layers.2").mkdir(parents=True)
    (folder / "sae" / "layers.2" / "sae.safetensors").write_bytes(payload)
    (folder / "sae" / "layers.2" / "cfg.json").write_text('{"k": 4}')
    return folder


def roundtrip(store, tmp_path):
    src = make_artifact(tmp_path / "src")
    manifest = store.commit("skill", ("arith",), src, {"name": "arith", "layers": [2]})
    assert set(manifest["files"]) == {"sae/layers.2/sae.safetensors", "sae/layers.2/cfg.json"}
    assert store.exists("skill", ("arith",))
    assert store.manifest("skill", ("arith",))["layers"] == [2]
    assert [m["name"] for m in store.list("skill")] == ["arith"]
    local = store.fetch("skill", ("arith",))
    assert (local / "sae" / "layers.2" / "sae.safetensors").read_bytes() == b"weights"
    store.commit("adapter", ("tiny-llama", "arith"), src, {"skill": "arith"})
    assert [m["key"] for m in store.list("adapter")] == [["tiny-llama", "arith"]]
    store.delete("skill", ("arith",))
    assert not store.exists("skill", ("arith",)) and store.list("skill") == []
    with pytest.raises(ArtifactNotFound):
        store.fetch("skill", ("arith",))


def test_local_roundtrip(store, tmp_path):
    roundtrip(store, tmp_path)


def test_relative_and_plain_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = ArtifactStore("file://./data/store")
    b = ArtifactStore(str(tmp_path / "data" / "store"))
    assert a.root == b.root == str(tmp_path / "data" / "store")


def test_conflict_refused_and_replace_explicit(store, tmp_path):
    src = make_artifact(tmp_path / "a")
    store.commit("skill", ("arith",), src, {"v": 1})
    with pytest.raises(ArtifactConflict, match="already exists"):
        store.commit("skill", ("arith",), src, {"v": 2})
    assert store.manifest("skill", ("arith",))["v"] == 1
    store.commit("skill", ("arith",), make_artifact(tmp_path / "b", b"new"), {"v": 2}, replace=True)
    assert store.manifest("skill", ("arith",))["v"] == 2
    assert (store.fetch("skill", ("arith",)) / "sae/layers.2/sae.safetensors").read_bytes() == b"new"


def test_interrupted_write_leaves_nothing_visible(store, tmp_path):
    src = make_artifact(tmp_path / "src")
    original = store._write_manifest

    def crash(prefix, manifest):
        raise KeyboardInterrupt("killed before the manifest")

    store._write_manifest = crash
    with pytest.raises(KeyboardInterrupt):
        store.commit("skill", ("arith",), src, {"name": "arith"})
    store._write_manifest = original
    # nothing of the half-written artifact is visible under its name
    assert not (tmp_path / "store" / "skills" / "arith").exists()
    assert not store.exists("skill", ("arith",))
    assert store.list("skill") == []
    with pytest.raises(ArtifactNotFound):
        store.fetch("skill", ("arith",))
    # a later commit of the same name succeeds; no staging leftovers remain
    store.commit("skill", ("arith",), src, {"name": "arith"})
    assert store.exists("skill", ("arith",))
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


def test_corruption_names_the_file(store, tmp_path):
    store.commit("skill", ("arith",), make_artifact(tmp_path / "src"), {})
    target = tmp_path / "store" / "skills" / "arith" / "sae" / "layers.2" / "sae.safetensors"
    target.write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatch, match="sae/layers.2/sae.safetensors"):
        store.fetch("skill", ("arith",))
    target.unlink()
    with pytest.raises(ChecksumMismatch, match="missing"):
        store.fetch("skill", ("arith",))


def test_corrupt_manifest_is_an_error_not_a_crash(store, tmp_path):
    store.commit("skill", ("arith",), make_artifact(tmp_path / "src"), {})
    (tmp_path / "store" / "skills" / "arith" / MANIFEST).write_text("{trunc")
    with pytest.raises(ChecksumMismatch, match="corrupt"):
        store.manifest("skill", ("arith",))
    assert store.list("skill") == []


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x" * 101, "sp ace"])
def test_invalid_names_refused(store, tmp_path, bad):
    with pytest.raises(InvalidName):
        store.commit("skill", (bad,), make_artifact(tmp_path / "src"), {})


def test_datasets_are_content_addressed(store):
    data = b'{"answer":"1","question":"q"}\n'
    info = store.put_dataset(data, rows=1)
    assert info.id == info.sha256 and len(info.id) == 64
    assert store.put_dataset(data, rows=1) == info  # idempotent
    assert store.get_dataset(info.id) == data
    assert store.dataset_info(info.id).rows == 1
    assert store.has_dataset(info.id) and not store.has_dataset("0" * 64) and not store.has_dataset("../x")
    assert [d.id for d in store.list_datasets()] == [info.id]
    with pytest.raises(ArtifactNotFound):
        store.get_dataset("0" * 64)
    with pytest.raises(ArtifactNotFound):
        store.get_dataset("../../etc/passwd")
    (store.fs.open(f"{store.root}/datasets/{info.id}.jsonl", "wb")).write(b"changed\n")
    with pytest.raises(ChecksumMismatch):
        store.get_dataset(info.id)
    store.delete_dataset(info.id)
    assert store.list_datasets() == []


def test_unsupported_url():
    with pytest.raises(StoreError, match="unsupported store URL"):
        ArtifactStore("ftp://host/x")


def test_staging_is_deterministic(tmp_path):
    st = Staging(tmp_path)
    a = st.folder("skill", "arith")
    (a / "ckpt.json").write_text("{}")
    assert st.folder("skill", "arith") == a and (a / "ckpt.json").exists()
    st.clear("skill", "arith")
    assert not a.exists()


def test_staging_is_per_store_so_services_sharing_a_cache_never_share_checkpoints(tmp_path, monkeypatch):
    one, two = Staging(tmp_path, f"file://{tmp_path / 'one'}"), Staging(tmp_path, "s3://bucket/two")
    assert one.folder("skill", "arith") != two.folder("skill", "arith")
    assert one.path("skill", "arith").parent.parent.parent == tmp_path / "staging"
    monkeypatch.chdir(tmp_path)  # a relative file URL is the same store as its absolute form
    assert Staging(tmp_path, "file://one").path("skill", "arith") == one.path("skill", "arith")


@pytest.fixture(scope="module")
def s3_server():
    from conftest import free_port
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_s3_store_roundtrip(s3_server, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="resa-test")
    opts = {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing", "secret": "testing"}
    store = ArtifactStore("s3://resa-test/prefix", cache_dir=tmp_path / "cache", storage_options=opts)
    assert store.ping()
    roundtrip(store, tmp_path)
    info = store.put_dataset(b'{"answer":"1","question":"q"}\n', rows=1)
    assert store.get_dataset(info.id).startswith(b'{"answer"')
    # corruption on the remote side is caught on fetch
    store.commit("skill", ("c",), make_artifact(tmp_path / "c"), {})
    store.fs.pipe_file("resa-test/prefix/skills/c/sae/layers.2/cfg.json", b"{}")
    with pytest.raises(ChecksumMismatch, match="cfg.json"):
        store.fetch("skill", ("c",))


def test_concurrent_commits_of_one_name_leave_one_winner(store, tmp_path):
    srcs = [make_artifact(tmp_path / f"s{i}", f"w{i}".encode()) for i in range(4)]
    outcomes = []

    def commit(i):
        try:
            store.commit("skill", ("race",), srcs[i], {"i": i})
            outcomes.append("ok")
        except (ArtifactConflict, StoreError, FileNotFoundError, OSError):
            outcomes.append("refused")

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "ok" in outcomes
    manifest = store.manifest("skill", ("race",))
    # whichever won, its manifest matches its files
    local = store.fetch("skill", ("race",))
    assert (local / "sae/layers.2/sae.safetensors").read_bytes() == f"w{manifest['i']}".encode()
    assert json.loads((tmp_path / "store" / "skills" / "race" / MANIFEST).read_text())["i"] == manifest["i"]
