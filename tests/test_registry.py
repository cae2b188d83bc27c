"""The model registry: atomic versions, checksums, champions, rollback, concurrent readers."""

from __future__ import annotations

import doctest
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import training.registry
from training.registry import (
    ModelNotFoundError,
    ModelRegistry,
    RegistryError,
    TamperedModelError,
)


def _model(folder: Path, weights: bytes, extra: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.bin").write_bytes(weights)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "config.json").write_text('{"dim": 8}')
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    return folder


def _register(registry: ModelRegistry, tmp_path: Path, weights: bytes, kind: str = "ranker"):
    return registry.register(
        kind,
        _model(tmp_path / f"build-{hashlib.sha1(weights).hexdigest()[:12]}", weights),
        metrics={"auc": 0.7, "ndcg@10": 0.05},
        data_window={"start": "2026-11-01T00:00:00Z", "end": "2026-11-24T00:00:00Z"},
        features=["user_realtime__views_1h", "item_stats__ctr_7d"],
        params={"dim": 8},
    )


def test_docstring_examples_run() -> None:
    failures, tried = doctest.testmod(training.registry, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def test_register_copies_files_and_writes_a_complete_manifest(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    v = _register(registry, tmp_path, b"abc")
    assert v.version.startswith("v0001-") and v.version.endswith("Z")
    assert (v.path / "weights.bin").read_bytes() == b"abc"
    assert (v.path / "sub" / "config.json").is_file()
    manifest = json.loads((v.path / "manifest.json").read_text())
    assert manifest["version"] == v.version and manifest["kind"] == "ranker"
    assert manifest["metrics"] == {"auc": 0.7, "ndcg@10": 0.05}
    assert manifest["data_window"]["end"] == "2026-11-24T00:00:00Z"
    assert manifest["features"] == ["user_realtime__views_1h", "item_stats__ctr_7d"]
    assert manifest["params"] == {"dim": 8}
    assert manifest["code_version"]
    assert set(manifest["files"]) == {"weights.bin", "sub/config.json"}
    assert all(len(h) == 64 for h in manifest["files"].values())
    assert manifest["created_at"].startswith("20")
    # The build folder is only read; no staging debris stays next to the versions.
    assert [p.name for p in registry.versions("ranker")[0].path.parent.iterdir()
            if not p.name.startswith(".")] == [v.version]


def test_versions_are_numbered_in_order_and_sort_as_strings(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    made = [_register(registry, tmp_path, bytes([i])).version for i in range(1, 4)]
    listed = [v.version for v in registry.versions("ranker")]
    assert listed == made == sorted(made)
    assert [v.number for v in registry.versions("ranker")] == [1, 2, 3]
    assert registry.versions("online") == []


def test_register_refuses_bad_input(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RegistryError, match="no files"):
        registry.register("ranker", empty, metrics={}, data_window={}, features=[])
    with pytest.raises(RegistryError, match="manifest"):
        registry.register(
            "ranker", _model(tmp_path / "m", b"x", {"manifest.json": b"{}"}),
            metrics={}, data_window={}, features=[],
        )
    with pytest.raises(RegistryError, match="invalid model kind"):
        registry.register("../etc", _model(tmp_path / "n", b"x"), metrics={},
                          data_window={}, features=[])


@pytest.mark.parametrize(
    "damage",
    ["changed", "truncated", "missing", "extra", "manifest_edited", "manifest_corrupt"],
)
def test_a_tampered_or_corrupt_model_is_refused(tmp_path: Path, damage: str) -> None:
    registry = ModelRegistry(tmp_path / "models")
    v = _register(registry, tmp_path, b"weights-v1")
    registry.promote("ranker", v.version)
    assert registry.open("ranker") == v.path
    if damage == "changed":
        (v.path / "weights.bin").write_bytes(b"weights-v2")
    elif damage == "truncated":
        (v.path / "sub" / "config.json").write_text("")
    elif damage == "missing":
        (v.path / "weights.bin").unlink()
    elif damage == "extra":
        (v.path / "payload.pkl").write_bytes(b"not in the manifest")
    elif damage == "manifest_edited":
        manifest = json.loads((v.path / "manifest.json").read_text())
        manifest["files"]["weights.bin"] = "0" * 64
        (v.path / "manifest.json").write_text(json.dumps(manifest))
    else:
        (v.path / "manifest.json").write_text("{not json")
    with pytest.raises(TamperedModelError):
        registry.open("ranker")
    with pytest.raises(TamperedModelError):
        registry.open("ranker", v.version)


def test_promote_refuses_a_tampered_version(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    good = _register(registry, tmp_path, b"good")
    bad = _register(registry, tmp_path, b"bad")
    registry.promote("ranker", good.version)
    (bad.path / "weights.bin").write_bytes(b"evil")
    with pytest.raises(TamperedModelError):
        registry.promote("ranker", bad.version)
    assert registry.champion("ranker").version == good.version


def test_promote_and_rollback_walk_the_champion_history(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    with pytest.raises(ModelNotFoundError):
        registry.open("ranker")
    assert registry.champion("ranker") is None
    v1, v2, v3 = (_register(registry, tmp_path, bytes([i])) for i in range(3))
    for v in (v1, v2, v2, v3):  # promoting the champion again changes nothing
        registry.promote("ranker", v.version)
    assert registry.champion("ranker").version == v3.version
    assert registry.history("ranker") == [v1.version, v2.version]
    assert registry.rollback("ranker").version == v2.version
    assert registry.open("ranker") == v2.path
    assert registry.rollback("ranker").version == v1.version
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback("ranker")
    assert registry.champion("ranker").version == v1.version
    with pytest.raises(ModelNotFoundError):
        registry.promote("ranker", "v0999-20260101T000000Z")


def test_prune_keeps_the_newest_the_champion_and_its_predecessor(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    vs = [_register(registry, tmp_path, bytes([i]), kind="online") for i in range(6)]
    registry.promote("online", vs[0].version)
    registry.promote("online", vs[1].version)
    deleted = registry.prune("online", keep=2)
    assert deleted == [vs[2].version, vs[3].version]
    kept = [v.version for v in registry.versions("online")]
    assert kept == [vs[0].version, vs[1].version, vs[4].version, vs[5].version]
    assert registry.rollback("online").version == vs[0].version


_WRITER = """
import sys, time
from pathlib import Path
from training.registry import ModelRegistry
registry = ModelRegistry(Path(sys.argv[1]))
a, b = sys.argv[2], sys.argv[3]
deadline = time.monotonic() + float(sys.argv[4])
n = 0
while time.monotonic() < deadline:
    registry.promote("ranker", b if n % 2 == 0 else a)
    n += 1
print(n)
"""


def test_concurrent_readers_see_the_old_or_the_new_champion(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    a = _register(registry, tmp_path, b"A" * 4096)
    b = _register(registry, tmp_path, b"B" * 4096)
    registry.promote("ranker", a.version)
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(registry.root), a.version, b.version, "3"],
        stdout=subprocess.PIPE, text=True,
    )
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        path = registry.open("ranker")  # never a torn pointer, never a checksum failure
        seen[path.name] = seen.get(path.name, 0) + 1
        assert (path / "weights.bin").read_bytes()[:1] in (b"A", b"B")
    out, _ = writer.communicate(timeout=30)
    assert writer.returncode == 0 and int(out) > 10
    assert set(seen) <= {a.version, b.version}
    assert len(set(seen)) == 2, seen


def test_concurrent_registrations_never_share_a_version(tmp_path: Path) -> None:
    root = tmp_path / "models"
    _model(tmp_path / "m", b"same")
    script = (
        "import sys; from pathlib import Path; from training.registry import ModelRegistry;"
        "r = ModelRegistry(Path(sys.argv[1]));"
        "[r.register('online', Path(sys.argv[2]), metrics={}, data_window={}, features=[])"
        " for _ in range(5)]"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(root), str(tmp_path / "m")])
        for _ in range(3)
    ]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    versions = ModelRegistry(root).versions("online")
    assert [v.number for v in versions] == list(range(1, 16))


def test_models_cli_lists_promotes_and_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamrec.cli import app
    from streamrec.settings import get_settings

    monkeypatch.setenv("STREAMREC_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        registry = ModelRegistry.from_settings(get_settings())
        assert registry.root == tmp_path / "home" / "models"
        v1 = _register(registry, tmp_path, b"1")
        v2 = _register(registry, tmp_path, b"2")
        runner = CliRunner()
        assert runner.invoke(app, ["models", "promote", v1.version]).exit_code == 0
        result = runner.invoke(app, ["models", "promote", v2.version, "--kind", "ranker"])
        assert result.exit_code == 0, result.output
        (v1.path / "weights.bin").write_bytes(b"tampered")
        listing = runner.invoke(app, ["models", "list"])
        assert listing.exit_code == 0
        lines = listing.output.splitlines()
        assert lines[0].split()[:3] == ["kind", "version", "created_at"]
        row1 = next(line for line in lines if v1.version in line)
        row2 = next(line for line in lines if v2.version in line)
        assert "TAMPERED" in row1 and row2.startswith("*") and " ok " in row2
        assert "auc=0.7" in row2
        rolled = runner.invoke(app, ["models", "rollback"])
        assert rolled.exit_code == 0 and v1.version in rolled.output
        # The champion is now the tampered version: loading it is refused.
        with pytest.raises(TamperedModelError):
            registry.open("ranker")
        failed = runner.invoke(app, ["models", "rollback", "--kind", "online"])
        assert failed.exit_code == 1
    finally:
        get_settings.cache_clear()
