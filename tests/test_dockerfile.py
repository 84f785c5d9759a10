"""The repository's Dockerfile (what the Kubernetes executor's error points to) installs the
project the way setup.sh does, on an interpreter setup.sh accepts, and puts what the pods run
on PATH. Read as text: no image is built."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.specifiers import SpecifierSet

from falcon_h1.errors import ConfigValueError
from launchers.config import ExecutorConfig
from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)", text))


def test_the_kubernetes_image_error_names_a_file_the_repository_has():
    from launchers.kubeflow import validate

    executor = ExecutorConfig(kind="kubernetes")
    with pytest.raises(ConfigValueError) as raised:
        validate(executor)
    named = re.findall(r"\b(Dockerfile[\w.-]*)", str(raised.value))
    assert named, str(raised.value)
    assert all((REPO / name).is_file() for name in named), named


def test_the_image_is_official_python_3_12_which_setup_sh_and_pyproject_accept():
    instructions = _instructions()
    base = next(args for op, args in instructions if op == "FROM")
    version = re.fullmatch(r"python:(3\.\d+)[\w.-]*", base)
    assert version, base
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(f"{version.group(1)}.0")
    # setup.sh looks for python3.12 on PATH, which the official image has at /usr/local/bin
    assert f"python{version.group(1)}" in (REPO / "setup.sh").read_text()


def test_the_image_installs_with_setup_sh_after_copying_the_repository_and_runs_the_cli():
    instructions = _instructions()
    ops = [op for op, _ in instructions]
    workdir = next(args for op, args in instructions if op == "WORKDIR")
    copy = ops.index("COPY")
    assert instructions[copy][1].split() == [".", "."]
    assert _runs_setup_sh(instructions) and ops.index("RUN") > copy
    # setup.sh makes .venv beside itself; the pods' `torchrun` and the entrypoint come from there
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert f"PATH={workdir}/.venv/bin:" in env, env
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = next(args for op, args in instructions if op == "ENTRYPOINT")
    assert entrypoint == '["falcon-train"]' and "falcon-train" in scripts
    # the host's .venv (and its setup stamp, which would skip the install) stays out of the image
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored


def _runs_setup_sh(instructions) -> bool:
    return any(op == "RUN" and re.search(r"(^|\s|&&\s*)\./setup\.sh\b", args) for op, args in instructions)


def test_the_image_gets_setup_sh_s_pins_and_contradicts_none():
    setup_pins = _pins((REPO / "setup.sh").read_text())
    assert "mamba-ssm" in setup_pins  # installed by setup.sh alone (not a dependency in pyproject)
    dockerfile_pins = _pins(DOCKERFILE.read_text())
    for name, version in setup_pins.items():  # through ./setup.sh, or the same install repeated
        assert _runs_setup_sh(_instructions()) or dockerfile_pins.get(name) == version, name
    known = setup_pins | _pins((REPO / "pyproject.toml").read_text())
    for name, version in dockerfile_pins.items():
        assert known.get(name) == version, (name, version, known.get(name))
