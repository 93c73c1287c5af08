"""The Dockerfile, checked without a Docker engine: its instructions are parsed, and the build stage's
install steps run for real in a fresh virtualenv (the slow test here: about a minute with pip's cache)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .chart import ROOT, manifests, of_kind

Instruction = tuple[str, str]


def stages() -> list[list[Instruction]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found: list[list[Instruction]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            found.append([])
        found[-1].append((instruction.upper(), args.strip()))
    return found


def args_of(stage: list[Instruction], instruction: str) -> list[str]:
    return [args for name, args in stage if name == instruction]


def test_final_image_runs_as_a_numeric_non_root_user_matching_the_chart() -> None:
    final = stages()[-1]
    (user,) = args_of(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or gid.isdigit()), user
    (created,) = args_of(final, "RUN")
    assert f"--uid {uid}" in created, "the user exists in /etc/passwd too"
    (deployment,) = of_kind(manifests({}), "Deployment")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_slim_base_exec_entrypoint_and_no_build_tools() -> None:
    for stage in stages():
        (base,) = args_of(stage, "FROM")
        assert re.match(r"python:3\.\d+-slim\b", base), base
    final = stages()[-1]
    assert json.loads(args_of(final, "ENTRYPOINT")[0]) == ["celery-worker-operator", "run"]
    everything = " ".join(args for stage in stages() for _, args in stage)
    assert not re.search(r"apt-get install|build-essential|gcc|\bmake\b", everything)
    assert [args.split()[0] for args in args_of(final, "COPY")] == ["--from=build"], "only the built venv"


def test_dockerignore_lets_in_exactly_what_the_build_copies() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]

    def sent(path: str) -> bool:
        included = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            if fnmatch.fnmatch(path, pattern.lstrip("!").rstrip("/")):
                included = negated
        return included

    copied = [src for args in args_of(stages()[0], "COPY") for src in args.split()[:-1]]
    assert all(sent(src.rstrip("/")) for src in copied), copied
    assert not any(sent(p) for p in (".venv", "tests", ".git", "deploy"))


def clean_env() -> dict[str, str]:
    """No inherited virtualenv or PYTHONPATH: the venv must stand on what the steps installed."""
    keep = ("HOME", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CACHE_DIR")
    return {"PATH": "/usr/bin:/bin"} | {k: v for k, v in os.environ.items() if k in keep}


@pytest.mark.timeout(300)
def test_build_stage_install_steps_work_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    """SLOW (about 1 min): the build stage's COPY and RUN steps replayed in a temp dir, then the
    installed entry point runs. /src and /opt/venv become temp paths; pip uses its cache."""
    build = stages()[0]
    source, venv = tmp_path / "src", tmp_path / "venv"
    source.mkdir()
    for args in args_of(build, "COPY"):
        *sources, _destination = args.split()
        for src in sources:
            origin = ROOT / src.rstrip("/")
            if origin.is_dir():
                shutil.copytree(origin, source / src.rstrip("/"), ignore=shutil.ignore_patterns("*.egg-info"))
            else:
                shutil.copy2(origin, source / src)
    for command in args_of(build, "RUN"):
        command = command.replace("/opt/venv", str(venv)).replace("python -m venv", f"{sys.executable} -m venv")
        subprocess.run(["sh", "-c", command], cwd=source, check=True, timeout=280, env=clean_env())
    version = subprocess.run(
        [str(venv / "bin" / "celery-worker-operator"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    )
    assert "0.1.0" in version.stdout
    help_ = subprocess.run(
        [str(venv / "bin" / "celery-worker-operator"), "run", "--help"], capture_output=True, env=clean_env()
    )
    assert help_.returncode == 0, help_.stderr
