"""docker-compose.yml: accepted by a compose implementation, and right about streamrec.

Structural checks read the YAML itself (they need no Docker): every service is
health-checked or says why not, dependencies wait only for what can report, every
streamrec service runs a command that exists in the CLI with options it accepts, and every
STREAMREC_* variable is a real setting. A service whose command is not written yet fails
here, by name, with the commands that do exist.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
import yaml
from typer.core import TyperGroup

from streamrec.cli import app
from streamrec.settings import Settings

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
IMAGE = "streamrec:"
_SPEC: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = _SPEC["services"]
STREAMREC_SERVICES = sorted(n for n, s in SERVICES.items() if s["image"].startswith(IMAGE))
_VARIABLE = re.compile(r"\$(?:\$|\{(\w+)(?:(:?-)([^}]*))?\})")


def _compose_command() -> list[str] | None:
    """``docker compose`` (the plugin) when it works, else Debian's ``docker-compose``."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone is not None else None


def test_a_compose_implementation_accepts_the_file() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip(
            "no compose implementation: neither the `docker compose` plugin nor "
            "`docker-compose` is installed (Debian: apt-get install docker-compose)"
        )
    done = subprocess.run([*command, "-f", str(COMPOSE_FILE), "config", "-q"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _interpolate(value: str) -> str:
    """Compose's variable substitution with nothing set: every default applies."""

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return m.group(3) or ""

    return _VARIABLE.sub(substitute, value)


def _parse_cli(args: list[str]) -> None:
    """Resolve ``streamrec <args>`` through typer's command tree and parse its options.

    Typer vendors its own click, so groups and errors are typer's types.
    """
    command = typer.main.get_command(app)
    path, rest = ["streamrec"], list(args)
    while isinstance(command, TyperGroup) and rest and not rest[0].startswith("-"):
        context = typer.Context(command, info_name=" ".join(path))
        name = rest.pop(0)
        found = command.get_command(context, name)
        if found is None:
            pytest.fail(f"`{' '.join(path)} {name}` does not exist; `{' '.join(path)}` has: "
                        f"{', '.join(sorted(command.list_commands(context)))}")
        path.append(name)
        command = found
    line = " ".join([*path, *rest])
    if isinstance(command, TyperGroup) and "--help" not in rest:
        pytest.fail(f"`{line}` names a group of commands, not a command")
    try:
        command.make_context(" ".join(path), list(rest))
    except typer.Exit as done:  # --help
        assert done.exit_code == 0
    except typer.TyperException as exc:  # click's UsageError and kin
        pytest.fail(f"`{line}`: {exc}")


@pytest.mark.parametrize("name", STREAMREC_SERVICES)
def test_the_service_command_exists_in_the_cli(name: str) -> None:
    _parse_cli([_interpolate(str(arg)) for arg in SERVICES[name]["command"]])


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_is_health_checked_or_says_why_not(name: str) -> None:
    service = SERVICES[name]
    check, reason = service.get("healthcheck"), service.get("x-no-healthcheck")
    if check is None:
        assert isinstance(reason, str) and len(reason.split()) >= 3, (
            f"{name}: no healthcheck and no `x-no-healthcheck: <reason>`"
        )
        return
    assert reason is None, f"{name}: a healthcheck and a reason not to have one"
    assert not check.get("disable") and check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_dependencies_wait_for_what_can_report() -> None:
    for name, service in SERVICES.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            target = SERVICES[dependency]
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in target, f"{name} waits for {dependency}'s health"
            else:
                assert condition == "service_completed_successfully", (name, condition)
                assert target.get("restart") == "no", f"{name} waits for {dependency} to exit"
            # A service of a profile is not started with the stack: nothing may need it.
            assert "profiles" not in target or "profiles" in service, (name, dependency)


def test_streamrec_services_share_the_configuration_and_the_home() -> None:
    anchor = _SPEC["x-streamrec-env"]
    settings = {f"STREAMREC_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(set(anchor) - settings)
    assert not unknown, f"not streamrec settings (typos?): {unknown}"
    volumes = _SPEC["x-streamrec"]["volumes"]
    for name in STREAMREC_SERVICES:
        assert SERVICES[name]["environment"] == anchor, name
        assert SERVICES[name]["volumes"] == volumes, name
    home = anchor["STREAMREC_HOME"]
    assert all(v.split(":")[1].startswith(home) for v in volumes)
    assert all(v.split(":")[0] in _SPEC["volumes"] for v in volumes)


def test_the_feature_writer_is_never_replicated() -> None:
    writer = SERVICES["feature-writer"]
    assert writer.get("deploy", {}).get("replicas", 1) == 1
    assert writer["command"] == ["worker", "features"]


def test_the_interpolation_applies_defaults() -> None:
    assert _interpolate("${A:-200}/${B-x}/${C}/$$HOME") == "200/x//$HOME"
