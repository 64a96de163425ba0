"""Settings defaults and the `resa` entry point."""

import pytest

from app.cli import build_parser, main
from app.settings import Settings, parse_api_keys


def test_defaults_need_no_environment(monkeypatch):
    for var in ("RESA_STORE_URL", "RESA_REDIS_URL", "RESA_MODELS_FILE", "RESA_API_KEYS"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert s.store_url == "file://./data/store"
    assert s.redis_url is None and s.models_file is None and s.keys == {}
    assert s.max_batch > 0 and s.max_new_tokens > 0 and s.adapter_cache_size > 0


def test_environment_prefix(monkeypatch):
    monkeypatch.setenv("RESA_API_KEYS", "k1:admin, k2:generate")
    monkeypatch.setenv("RESA_MAX_BATCH", "4")
    monkeypatch.setenv("RESA_STORE_OPTIONS", '{"client_kwargs": {"endpoint_url": "http://s3:9000"}}')
    s = Settings()
    assert s.keys == {"k1": "admin", "k2": "generate"}
    assert s.max_batch == 4
    assert s.store_options["client_kwargs"]["endpoint_url"] == "http://s3:9000"


@pytest.mark.parametrize("bad", ["justakey", "k:root", ":admin"])
def test_bad_api_keys_refused(bad):
    with pytest.raises(ValueError, match="key:scope"):
        parse_api_keys(bad)


def test_every_design_verb_is_wired():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"serve", "worker", "models", "extract", "tune", "generate", "inspect", "eval", "demo"} <= set(sub.choices)


def test_resa_models_lists_bundled_and_registered(resa_env, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "llama" in out and "576" in out
    assert "tiny-qwen" in out


def test_bad_models_file_is_one_line_error(monkeypatch, tmp_path, capsys):
    from app.settings import get_settings

    bad = tmp_path / "m.toml"
    bad.write_text("[models.x]\n")
    monkeypatch.setenv("RESA_MODELS_FILE", str(bad))
    get_settings.cache_clear()
    try:
        assert main(["models"]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err.strip()
    assert err.startswith("resa models: error:") and "exactly one of" in err and "\n" not in err
