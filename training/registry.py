"""Versioned model registry on a plain file system: immutable versions, a champion pointer.

A *kind* (``"ranker"``, ``"online"``) holds versions, each a folder
``<root>/<kind>/<version>/`` with the model's files and a ``manifest.json``: metrics, the
data window it was trained on, the features it reads, its parameters, the code version that
produced it, when, and the sha256 of every file. Version ids sort by age
(``v0007-20261124T101500Z``: a counter, then the UTC moment).

Every write is a rename, so a reader never sees half of anything:

* :meth:`ModelRegistry.register` copies into a staging folder, then renames it into place;
* the champion is a pointer file ``<root>/<kind>/champion.json`` (the version, plus the
  previous champions for :meth:`ModelRegistry.rollback`) replaced with ``os.replace``;
* writers of one kind serialise on a lock file, so two trainers never take the same id.

:meth:`ModelRegistry.open` is how a model is loaded: it checks every file against the
manifest and raises :class:`TamperedModelError` on a changed, missing or unexpected file,
so a corrupt or tampered model is refused instead of served.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> root = Path(tempfile.mkdtemp())
>>> (root / "build").mkdir()
>>> _ = (root / "build" / "weights.json").write_text('{"w": [0.5]}')
>>> registry = ModelRegistry(root / "models")
>>> v1 = registry.register("online", root / "build", metrics={"auc": 0.71},
...                        data_window={"start": "2026-11-01", "end": "2026-11-24"},
...                        features=["user_views_1h"])
>>> registry.champion("online") is None
True
>>> registry.promote("online", v1.version).version == v1.version
True
>>> (registry.open("online") / "weights.json").read_text()
'{"w": [0.5]}'
>>> _ = (registry.open("online") / "weights.json").write_text('{"w": [9.9]}')
>>> registry.open("online")
Traceback (most recent call last):
...
training.registry.TamperedModelError: online/v0001-...: weights.json: sha256 mismatch ...
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamrec.settings import Settings

__all__ = [
    "MANIFEST",
    "ModelNotFoundError",
    "ModelRegistry",
    "ModelVersion",
    "RegistryError",
    "TamperedModelError",
    "code_version",
    "sha256_file",
]

MANIFEST = "manifest.json"
"""Name of the manifest file inside every version folder."""

_POINTER = "champion.json"
_LOCK = ".lock"
_STAGING = ".staging"
_KIND = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_VERSION = re.compile(r"^v(\d{4,})-(\d{8}T\d{6}Z)$")
_STALE_STAGING_S = 3600.0
_CHUNK = 1 << 20


class RegistryError(Exception):
    """A registry operation that cannot be done (unknown kind, nothing to roll back to, …)."""


class ModelNotFoundError(RegistryError, LookupError):
    """No such version, or no champion yet."""


class TamperedModelError(RegistryError):
    """A version's files do not match its manifest: changed, missing or unexpected."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: its kind, id, folder and parsed manifest.

    ``manifest`` is empty when the manifest itself is unreadable; :meth:`ModelRegistry.open`
    refuses such a version.
    """

    kind: str
    version: str
    path: Path
    manifest: Mapping[str, Any]

    @property
    def number(self) -> int:
        """The counter part of the id (``7`` for ``v0007-…``)."""
        return _version_number(self.version)

    @property
    def metrics(self) -> Mapping[str, Any]:
        """The manifest's metrics (empty when absent)."""
        return self.manifest.get("metrics", {})

    @property
    def created_at(self) -> str:
        """ISO-8601 UTC time of registration."""
        return str(self.manifest.get("created_at", ""))


class ModelRegistry:
    """Model versions and champions of every kind under one root folder.

    Parameters
    ----------
    root
        The registry folder (created on first write).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "m").mkdir()
    >>> _ = (root / "m" / "w.bin").write_bytes(b"v1")
    >>> reg = ModelRegistry(root / "models")
    >>> a = reg.register("ranker", root / "m", metrics={}, data_window={}, features=[])
    >>> _ = (root / "m" / "w.bin").write_bytes(b"v2")
    >>> b = reg.register("ranker", root / "m", metrics={}, data_window={}, features=[])
    >>> [v.number for v in reg.versions("ranker")]
    [1, 2]
    >>> _ = reg.promote("ranker", a.version); _ = reg.promote("ranker", b.version)
    >>> reg.rollback("ranker").version == a.version
    True
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        """The registry of a deployment: ``<home>/models``."""
        return cls(settings.home / "models")

    # --- writing ------------------------------------------------------------------------

    def register(
        self,
        kind: str,
        folder: Path,
        *,
        metrics: dict,
        data_window: dict,
        features: Sequence[str],
        params: dict | None = None,
    ) -> ModelVersion:
        """Copy ``folder``'s files into a new version of ``kind``; the champion is unchanged.

        Parameters
        ----------
        kind
            Model family, lowercase (``ranker``, ``online``).
        folder
            The model's files (sub-folders kept). It must not contain ``manifest.json``.
        metrics, data_window, params
            JSON-serialisable facts recorded in the manifest.
        features
            Feature references the model reads (``view__feature`` or model-level names).

        Returns
        -------
        ModelVersion
            The new version, already in place.
        """
        kind_dir = self._kind_dir(kind)
        folder = Path(folder)
        if not folder.is_dir():
            raise RegistryError(f"{folder} is not a folder")
        sources = sorted(p for p in folder.rglob("*") if p.is_file())
        if not sources:
            raise RegistryError(f"{folder} holds no files")
        if (folder / MANIFEST).exists():
            raise RegistryError(f"{folder} already holds a {MANIFEST}; the registry writes it")
        staging_root = kind_dir / _STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        _remove_stale(staging_root)
        stage = staging_root / uuid.uuid4().hex
        stage.mkdir()
        try:
            files: dict[str, str] = {}
            for src in sources:
                rel = src.relative_to(folder).as_posix()
                dst = stage / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                _fsync_file(dst)
                # Hash the copy, not the source: the copy is what open() will check.
                files[rel] = sha256_file(dst)
            manifest: dict[str, Any] = {
                "kind": kind,
                "metrics": metrics,
                "data_window": data_window,
                "features": list(features),
                "params": params or {},
                "code_version": code_version(),
                "files": files,
            }
            with self._locked(kind):
                number = max((v.number for v in self.versions(kind)), default=0) + 1
                now = datetime.now(UTC)
                version = f"v{number:04d}-{now:%Y%m%dT%H%M%SZ}"
                manifest = {"version": version, "created_at": now.isoformat(), **manifest}
                _write_json(stage / MANIFEST, manifest)
                _fsync_dir(stage)
                os.rename(stage, kind_dir / version)
                _fsync_dir(kind_dir)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return ModelVersion(kind, version, kind_dir / version, manifest)

    def promote(self, kind: str, version: str) -> ModelVersion:
        """Make ``version`` the champion of ``kind`` (after verifying its files).

        The previous champion goes onto the rollback history. Promoting the champion again
        changes nothing.
        """
        target = self.get(kind, version)
        self.verify(target)
        with self._locked(kind):
            pointer = self._read_pointer(kind)
            current = pointer.get("champion")
            if current == version:
                return target
            history = [*pointer.get("history", []), current] if current else []
            self._write_pointer(kind, version, history)
        return target

    def rollback(self, kind: str) -> ModelVersion:
        """Restore the previous champion of ``kind``; the current one leaves the history.

        Previous champions whose folders were pruned are skipped.
        """
        with self._locked(kind):
            pointer = self._read_pointer(kind)
            history = list(pointer.get("history", []))
            while history:
                previous = history.pop()
                if (self._kind_dir(kind) / previous / MANIFEST).is_file():
                    self._write_pointer(kind, previous, history)
                    return self.get(kind, previous)
        raise RegistryError(f"{kind}: no previous champion to roll back to")

    def prune(self, kind: str, keep: int) -> list[str]:
        """Delete all but the ``keep`` newest versions of ``kind``; the champion and the
        previous champion stay. Returns the deleted ids."""
        if keep < 1:
            raise ValueError("keep must be ≥ 1")
        with self._locked(kind):
            pointer = self._read_pointer(kind)
            history = pointer.get("history", [])
            protected = {pointer.get("champion"), *history[-1:]}
            doomed = [
                v.version for v in self.versions(kind)[:-keep] if v.version not in protected
            ]
            for version in doomed:
                # Rename first: a reader listing versions never sees a half-deleted folder.
                trash = self._kind_dir(kind) / _STAGING / f"deleted-{version}"
                os.rename(self._kind_dir(kind) / version, trash)
                shutil.rmtree(trash, ignore_errors=True)
            if pointer.get("champion") and set(doomed) & set(history):
                self._write_pointer(
                    kind, pointer["champion"], [h for h in history if h not in doomed]
                )
        return doomed

    # --- reading ------------------------------------------------------------------------

    def kinds(self) -> list[str]:
        """Kinds with at least one version folder, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _KIND.match(p.name) and p.is_dir())

    def versions(self, kind: str) -> list[ModelVersion]:
        """Every version of ``kind``, oldest first."""
        kind_dir = self._kind_dir(kind)
        if not kind_dir.is_dir():
            return []
        found = [
            self._load(kind, p.name)
            for p in kind_dir.iterdir()
            if _VERSION.match(p.name) and p.is_dir()
        ]
        return sorted(found, key=lambda v: v.number)

    def get(self, kind: str, version: str) -> ModelVersion:
        """One version by id (not verified)."""
        if not _VERSION.match(version) or not (self._kind_dir(kind) / version).is_dir():
            raise ModelNotFoundError(f"{kind}: no version {version!r}")
        return self._load(kind, version)

    def champion(self, kind: str) -> ModelVersion | None:
        """The current champion of ``kind`` (not verified), ``None`` before any promotion."""
        name = self._read_pointer(kind).get("champion")
        return self.get(kind, name) if name else None

    def history(self, kind: str) -> list[str]:
        """Previous champions of ``kind``, oldest first (what rollback walks back through)."""
        return list(self._read_pointer(kind).get("history", []))

    def open(self, kind: str, version: str | None = None) -> Path:
        """The folder of ``version`` (the champion by default), after verifying every file.

        Raises
        ------
        ModelNotFoundError
            No such version, or no champion.
        TamperedModelError
            A file differs from its manifest checksum, is missing, or is not in the manifest.
        """
        if version is None:
            chosen = self.champion(kind)
            if chosen is None:
                raise ModelNotFoundError(f"{kind}: no champion promoted yet")
        else:
            chosen = self.get(kind, version)
        self.verify(chosen)
        return chosen.path

    def verify(self, version: ModelVersion) -> None:
        """Raise :class:`TamperedModelError` unless the folder matches its manifest exactly."""
        name = f"{version.kind}/{version.version}"
        files = version.manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise TamperedModelError(f"{name}: {MANIFEST} is missing or unreadable")
        if version.manifest.get("version") != version.version:
            raise TamperedModelError(f"{name}: {MANIFEST} describes another version")
        present = {
            p.relative_to(version.path).as_posix()
            for p in version.path.rglob("*")
            if p.is_file() or p.is_symlink()
        } - {MANIFEST}
        extra = sorted(present - set(files))
        if extra:
            raise TamperedModelError(f"{name}: files not in the manifest: {', '.join(extra)}")
        for rel, expected in sorted(files.items()):
            path = version.path / rel
            if rel not in present or path.is_symlink():
                raise TamperedModelError(f"{name}: {rel}: missing")
            actual = sha256_file(path)
            if actual != expected:
                raise TamperedModelError(
                    f"{name}: {rel}: sha256 mismatch (manifest {expected[:12]}…, "
                    f"file {actual[:12]}…)"
                )

    # --- internals ----------------------------------------------------------------------

    def _kind_dir(self, kind: str) -> Path:
        if not _KIND.match(kind):
            raise RegistryError(f"invalid model kind {kind!r} (lowercase letters, digits, -, _)")
        return self.root / kind

    def _load(self, kind: str, version: str) -> ModelVersion:
        path = self._kind_dir(kind) / version
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = {}
        return ModelVersion(kind, version, path, manifest if isinstance(manifest, dict) else {})

    def _read_pointer(self, kind: str) -> dict[str, Any]:
        try:
            pointer = json.loads((self._kind_dir(kind) / _POINTER).read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise RegistryError(f"{kind}: unreadable {_POINTER}: {exc}") from None
        return pointer if isinstance(pointer, dict) else {}

    def _write_pointer(self, kind: str, champion: str, history: list[str]) -> None:
        pointer = {
            "champion": champion,
            "history": history,
            "updated_at": datetime.now(UTC).isoformat(),
        }
        target = self._kind_dir(kind) / _POINTER
        tmp = target.with_name(f".{_POINTER}.{uuid.uuid4().hex}")
        _write_json(tmp, pointer)
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    @contextmanager
    def _locked(self, kind: str) -> Iterator[None]:
        kind_dir = self._kind_dir(kind)
        kind_dir.mkdir(parents=True, exist_ok=True)
        with open(kind_dir / _LOCK, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """``git describe --always --dirty`` of the source tree, else the package version."""
    source = Path(__file__).resolve().parent.parent
    if (source / ".git").exists():
        try:
            described = subprocess.run(
                ["git", "describe", "--always", "--dirty", "--tags"],
                cwd=source,
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            described = ""
        if described:
            return f"git:{described}"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"streamrec=={version('streamrec')}"
    except PackageNotFoundError:
        return "unknown"


def _version_number(version: str) -> int:
    match = _VERSION.match(version)
    if not match:
        raise ValueError(f"not a version id: {version!r}")
    return int(match.group(1))


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(staging_root: Path) -> None:
    """Drop staging folders a crashed writer left behind (older than an hour)."""
    cutoff = time.time() - _STALE_STAGING_S
    for leftover in staging_root.iterdir():
        try:
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            continue
