"""The artifact store: skills, adapters and datasets over a local folder or S3 (fsspec).

Layout (DESIGN §4):
  skills/<skill>/manifest.json + sae/layers.<i>/{cfg.json, sae.safetensors}
  adapters/<target>/<skill>/manifest.json + adapter_config.json + adapter_model.safetensors
  datasets/<sha256>.jsonl

The manifest is written last and lists the sha256 of every file: an artifact without a
manifest does not exist, and every load checks the files against it.

Just over 400 lines: the three artifact kinds share one write protocol (stage, upload, manifest
last) and one verify-on-read path, which is clearer in one class than spread over three.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

log = logging.getLogger("resa.store")

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
KINDS = {"skill": ("skills", 1), "adapter": ("adapters", 2)}  # kind -> (folder, key parts)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class StoreError(Exception):
    """Base of every store error; the message names the artifact or file."""


class ArtifactNotFound(StoreError):
    pass


class ArtifactConflict(StoreError):
    pass


class CorruptArtifact(StoreError):
    """An artifact that cannot be used as stored: a manifest of the wrong shape, a file that does not match it."""


class ChecksumMismatch(CorruptArtifact):
    pass


class InvalidName(StoreError, ValueError):
    pass


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise InvalidName(
            f"invalid {what} {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class DatasetInfo:
    id: str
    sha256: str
    rows: int
    bytes: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ArtifactStore:
    """One store, addressed by URL: `file:///abs/path`, `file://./rel`, a plain path, or `s3://bucket/prefix`."""

    def __init__(self, url: str, *, cache_dir: Path | str | None = None, storage_options: dict | None = None):
        self.url = url
        protocol, path = _split_url(url)
        options = dict(storage_options or {})
        if protocol != "file":
            # Other processes (API replicas, workers) change a shared store at any time: a cached
            # listing would keep deleted artifacts "existing" and never show new ones here.
            options.setdefault("use_listings_cache", False)
        self.fs = fsspec.filesystem(protocol, **options)
        self.local = protocol == "file"
        if self.local:
            path = str(Path(path).expanduser().resolve())
            Path(path).mkdir(parents=True, exist_ok=True)
        self.root = path.rstrip("/")
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "resa") / "store" / hashlib.sha256(url.encode()).hexdigest()[:16]

    # ------------------------------------------------------------ paths

    def _prefix(self, kind: str, key: tuple[str, ...]) -> str:
        folder, parts = KINDS[kind]
        if len(key) != parts:
            raise ValueError(f"{kind} key needs {parts} part(s), got {key!r}")
        for part in key:
            check_name(part, f"{kind} name" if parts == 1 else "name")
        return "/".join((self.root, folder, *key))

    def _exists(self, path: str) -> bool:
        try:
            return self.fs.exists(path)
        except FileNotFoundError:
            return False

    # ------------------------------------------------------------ skills and adapters

    def exists(self, kind: str, key: tuple[str, ...]) -> bool:
        return self._exists(f"{self._prefix(kind, key)}/{MANIFEST}")

    def commit(
        self, kind: str, key: tuple[str, ...], local_dir: Path | str, manifest: dict[str, Any], *, replace: bool = False
    ) -> dict[str, Any]:
        """Upload every file under `local_dir`, then the manifest (with their sha256) last."""
        local_dir = Path(local_dir)
        prefix = self._prefix(kind, key)
        label = f"{kind} {'/'.join(key)!r}"
        if self.exists(kind, key) and not replace:
            raise ArtifactConflict(f"{label} already exists (delete it first or ask to replace it)")
        files = {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            if rel != MANIFEST:
                files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        if not files:
            raise StoreError(f"{label}: nothing to commit in {local_dir}")
        full = {
            **manifest, "kind": kind, "key": list(key), "format_version": FORMAT_VERSION, "created_at": _now(),
            "version": uuid.uuid4().hex,  # unique per commit: cache keys must never collide (created_at is per second)
            "files": files,
        }  # fmt: skip
        if self.local:
            self._commit_local(Path(prefix), local_dir, full, replace, label)
            return full
        if self.exists(kind, key):
            self.fs.rm(f"{prefix}/{MANIFEST}")  # the old artifact stops existing before its files change
        if self._exists(prefix):
            self.fs.rm(prefix, recursive=True)  # leftovers of an interrupted write, or the replaced artifact
        for rel in files:
            self.fs.put_file(str(local_dir / rel), f"{prefix}/{rel}")
        self._write_manifest(prefix, full)
        return full

    def _commit_local(self, target: Path, local_dir: Path, manifest: dict, replace: bool, label: str) -> None:
        """Build the artifact in a private staging folder, then rename it into place in one step."""
        staging_root = Path(self.root) / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        staged = staging_root / uuid.uuid4().hex
        try:
            for rel in manifest["files"]:
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local_dir / rel, staged / rel)
            self._write_manifest(str(staged), manifest)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                if (target / MANIFEST).exists() and not replace:
                    raise ArtifactConflict(f"{label} already exists (delete it first or ask to replace it)")
                # the replaced artifact (or an old leftover) moves out of sight in one rename
                target.rename(staging_root / f"{uuid.uuid4().hex}-old")
            try:
                staged.rename(target)
            except OSError:  # another writer got there between our check and our rename
                raise ArtifactConflict(f"{label} was created concurrently") from None
        finally:
            shutil.rmtree(staged, ignore_errors=True)
            for old in staging_root.glob("*-old"):
                shutil.rmtree(old, ignore_errors=True)

    def _write_manifest(self, prefix: str, manifest: dict) -> None:
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        tmp = f"{prefix}/.{MANIFEST}.{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, f"{prefix}/{MANIFEST}")  # a rename on local disks; an atomic PUT of a copy on S3

    def manifest(self, kind: str, key: tuple[str, ...]) -> dict[str, Any]:
        """The artifact's manifest, checked for the shape every artifact has (CorruptArtifact if not)."""
        path = f"{self._prefix(kind, key)}/{MANIFEST}"
        label = f"{kind} {'/'.join(key)!r}"
        try:
            manifest = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            raise ArtifactNotFound(f"{label} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ChecksumMismatch(f"{label}: {MANIFEST} is corrupt ({exc})") from None
        problem = _manifest_problem(manifest, key)
        if problem:
            raise CorruptArtifact(f"{label}: {MANIFEST} is corrupt ({problem})")
        return manifest

    def list(self, kind: str) -> list[dict[str, Any]]:
        folder, parts = KINDS[kind]
        pattern = "/".join((self.root, folder, *("*" for _ in range(parts)), MANIFEST))
        out = []
        for path in sorted(self.fs.glob(pattern)):
            key = tuple(path.rstrip("/").split("/")[-1 - parts : -1])
            try:
                out.append(self.manifest(kind, key))
            except CorruptArtifact as exc:
                log.warning("not listed: %s", exc)  # one damaged artifact must not break the listing
            except StoreError:
                continue  # being written: not listed yet
        return out

    def delete(self, kind: str, key: tuple[str, ...]) -> None:
        prefix = self._prefix(kind, key)
        if not self.exists(kind, key):
            raise ArtifactNotFound(f"{kind} {'/'.join(key)!r} not found")
        self.fs.rm(f"{prefix}/{MANIFEST}")
        self.fs.rm(prefix, recursive=True)

    def fetch(self, kind: str, key: tuple[str, ...]) -> Path:
        """A local folder holding the artifact, every file verified against the manifest."""
        manifest = self.manifest(kind, key)
        prefix = self._prefix(kind, key)
        if self.local:
            folder = Path(prefix)
        else:
            folder = self.cache_dir / KINDS[kind][0] / Path(*key) / version_of(manifest).replace(":", "")
        for rel, meta in manifest["files"].items():
            target = folder / rel
            if not self.local and target.exists() and target.stat().st_size == meta["bytes"] and sha256_file(target) != meta["sha256"]:
                target.unlink()  # a cached copy of another version: download it again
            if not self.local and not (target.exists() and target.stat().st_size == meta["bytes"]):
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
                try:
                    self.fs.get_file(f"{prefix}/{rel}", str(tmp))
                except FileNotFoundError:
                    raise ChecksumMismatch(f"{kind} {'/'.join(key)!r}: file {rel} listed in the manifest is missing") from None
                tmp.replace(target)
            if not target.exists():
                raise ChecksumMismatch(f"{kind} {'/'.join(key)!r}: file {rel} listed in the manifest is missing")
            actual = sha256_file(target)
            if actual != meta["sha256"]:
                raise ChecksumMismatch(
                    f"{kind} {'/'.join(key)!r}: checksum mismatch for {rel} (manifest {meta['sha256'][:12]}…, file {actual[:12]}…)"
                )
        return folder

    # ------------------------------------------------------------ datasets (content-addressed)

    def _dataset_path(self, sha: str) -> str:
        if not SHA_RE.match(sha or ""):
            raise ArtifactNotFound(f"dataset {sha!r} not found (ids are 64 hex characters)")
        return f"{self.root}/datasets/{sha}.jsonl"

    def put_dataset(self, jsonl: bytes, rows: int) -> DatasetInfo:
        """Store normalized JSONL under its sha256; storing the same rows twice is a no-op."""
        sha = hashlib.sha256(jsonl).hexdigest()
        path = self._dataset_path(sha)
        if not self._exists(path):
            self.fs.makedirs(f"{self.root}/datasets", exist_ok=True)
            tmp = f"{self.root}/datasets/.{sha}.{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, jsonl)
            self.fs.mv(tmp, path)
        return DatasetInfo(id=sha, sha256=sha, rows=rows, bytes=len(jsonl))

    def has_dataset(self, sha: str) -> bool:
        try:
            return self._exists(self._dataset_path(sha))
        except ArtifactNotFound:
            return False

    def get_dataset(self, sha: str) -> bytes:
        try:
            data = self.fs.cat_file(self._dataset_path(sha))
        except FileNotFoundError:
            raise ArtifactNotFound(f"dataset {sha!r} not found") from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise ChecksumMismatch(f"dataset {sha!r}: checksum mismatch for datasets/{sha}.jsonl")
        return data

    def dataset_info(self, sha: str) -> DatasetInfo:
        data = self.get_dataset(sha)
        return DatasetInfo(id=sha, sha256=sha, rows=data.count(b"\n"), bytes=len(data))

    def list_datasets(self) -> list[DatasetInfo]:
        out = []
        for path in sorted(self.fs.glob(f"{self.root}/datasets/*.jsonl")):
            sha = path.rsplit("/", 1)[-1].removesuffix(".jsonl")
            try:
                out.append(self.dataset_info(sha))
            except StoreError:
                continue
        return out

    def datasets_bytes(self) -> int:
        """Bytes held by stored datasets (sizes from a listing: nothing is read)."""
        try:
            entries = self.fs.ls(f"{self.root}/datasets", detail=True)
        except FileNotFoundError:
            return 0
        return sum(int(e.get("size") or 0) for e in entries if str(e.get("name", "")).endswith(".jsonl"))

    def delete_dataset(self, sha: str) -> None:
        path = self._dataset_path(sha)
        if not self._exists(path):
            raise ArtifactNotFound(f"dataset {sha!r} not found")
        self.fs.rm(path)

    # ------------------------------------------------------------ evaluation reports

    def put_report(self, target: str, skill: str, name: str, report: dict) -> str:
        """Keep an evaluation report of (target, skill) as `reports/<target>/<skill>/<name>.json`; returns its name."""
        check_name(target, "model name"), check_name(skill, "skill name"), check_name(name, "report name")
        folder = f"{self.root}/reports/{target}/{skill}"
        self.fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, json.dumps(report, default=str).encode())
        self.fs.mv(tmp, f"{folder}/{name}.json")
        return name

    def reports(self, target: str, skill: str) -> list[str]:
        """Names of the kept evaluation reports of (target, skill), oldest first (names sort by time)."""
        check_name(target, "model name"), check_name(skill, "skill name")
        paths = self.fs.glob(f"{self.root}/reports/{target}/{skill}/*.json")
        return sorted(p.rsplit("/", 1)[-1].removesuffix(".json") for p in paths)

    def get_report(self, target: str, skill: str, name: str) -> dict:
        check_name(target, "model name"), check_name(skill, "skill name"), check_name(name, "report name")
        try:
            data = json.loads(self.fs.cat_file(f"{self.root}/reports/{target}/{skill}/{name}.json"))
        except FileNotFoundError:
            raise ArtifactNotFound(f"report {target}/{skill}/{name} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptArtifact(f"report {target}/{skill}/{name} is corrupt ({exc})") from None
        if not isinstance(data, dict):
            raise CorruptArtifact(f"report {target}/{skill}/{name} is corrupt (not a JSON object)")
        return data

    # ------------------------------------------------------------ health

    def ping(self) -> bool:
        try:
            self.fs.ls(self.root, detail=False)
            return True
        except FileNotFoundError:
            return not self.local  # an empty S3 prefix is a reachable store; a vanished local root (lost volume) is not
        except Exception:
            return False


def version_of(manifest: dict) -> str:
    """What changes with every commit of an artifact (older manifests have no `version`)."""
    return str(manifest.get("version") or manifest.get("created_at", ""))


def _manifest_problem(manifest: Any, key: tuple[str, ...]) -> str | None:
    """Why a manifest cannot be an artifact's (None when it has the shape `commit` writes)."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if manifest.get("key") != list(key):
        return f"key {manifest.get('key')!r} is not {list(key)!r}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "no `files` table"
    for rel, meta in files.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not isinstance(meta.get("bytes"), int):
            return f"file entry {rel!r} has no sha256 and bytes"
        if rel.startswith("/") or ".." in rel.split("/"):
            return f"file entry {rel!r} leaves the artifact"
    if not isinstance(manifest.get("created_at"), str):
        return "no `created_at`"
    return None


def _split_url(url: str) -> tuple[str, str]:
    if "://" not in url:
        return "file", url
    protocol, _, path = url.partition("://")
    if protocol in ("file", "local"):
        return "file", path
    if protocol in ("s3", "s3a"):
        return "s3", path
    if protocol == "memory":
        return "memory", "/" + path.lstrip("/")
    raise StoreError(f"unsupported store URL {url!r} (use file://, s3:// or memory://)")


@dataclass
class Staging:
    """A deterministic local folder where a job writes an artifact before committing it.

    Same store and job key -> same folder, so a retried job resumes from its checkpoint instead of
    starting over; the folder is removed once the artifact is committed. Folders are per store: two
    services (or a demo beside a server) sharing one cache dir never write each other's checkpoints.
    """

    root: Path
    store_url: str = ""

    def path(self, kind: str, *key: str) -> Path:
        url = self.store_url
        if url.startswith(("file://", "local://")) or "://" not in url:
            url = "file://" + str(Path(_split_url(url)[1]).resolve()) if url else ""
        scope = hashlib.sha256(url.encode()).hexdigest()[:12]
        return self.root / "staging" / scope / kind / Path(*key)

    def folder(self, kind: str, *key: str) -> Path:
        path = self.path(kind, *key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clear(self, kind: str, *key: str) -> None:
        shutil.rmtree(self.path(kind, *key), ignore_errors=True)
