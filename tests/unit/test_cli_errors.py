"""Bad input as a new user gives it: one message naming the file, line, field or option, exit code 2."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from celery_worker_operator.cli import main
from tests.unit.test_spec import BROKEN, CRD_FILE, mutate

ROOT = Path(__file__).resolve().parents[2]
ADOPTED = ROOT / "examples" / "rabbitmq-adopted-pool.yaml"
MANAGED = ROOT / "examples" / "redis-managed-pool.yaml"


def run(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), input=stdin)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def write(path: Path, document: Any) -> Path:
    path.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document)
    return path


@pytest.mark.parametrize(("what", "document", "field"), BROKEN, ids=[b[0] for b in BROKEN])
def test_validate_reports_every_broken_spec_by_field(what: str, document: dict[str, Any], field: str, tmp_path: Path):
    code, output = run("validate", str(write(tmp_path / "pool.yaml", document)))
    assert code == 2, what
    assert re.search(field, output), output
    assert "s3cret" not in output
    assert "should match pattern" not in output, "a regex is not a message for people"


def test_validate_reports_all_problems_of_a_file_in_one_pass(tmp_path: Path) -> None:
    document = mutate(
        "metadata.name",
        "Emails_Pool",
        spec__queues=["emails", "emails"],
        spec__worker__concurrency=0,
        spec__worker__pool="fork",
        spec__autoscaling={"minReplicas": 5, "maxReplicas": 2},
        spec__limits__rateLimits={"shop.tasks.send": "0/m"},
        spec__limits__timeLimits={"shop.tasks.send": {"soft": 9, "hard": 3}},
        spec__autoscale={"maxReplicas": 3},
    )
    code, output = run("validate", str(write(tmp_path / "pool.yaml", document)))
    assert code == 2
    for field in (
        "metadata.name: must be a DNS-1123 name",
        "spec.queues: queues must not repeat a name",
        "spec.worker.concurrency",
        "spec.worker.pool",
        "spec.autoscaling.maxReplicas: maxReplicas must be >= minReplicas",
        "spec.limits.rateLimits.shop.tasks.send: must be a rate above zero",
        "spec.limits.timeLimits.shop.tasks.send.soft: soft must be less than hard",
        "spec.autoscale: is not a field here",
    ):
        assert field in output, f"{field!r} missing from:\n{output}"


def test_every_broken_spec_at_once_across_documents(tmp_path: Path) -> None:
    """All of test_spec's broken specs in one multi-document file: one run reports each of them."""
    stream = yaml.safe_dump_all([document for _, document, _ in BROKEN])
    code, output = run("validate", str(write(tmp_path / "all.yaml", stream)))
    assert code == 2
    assert f"{len(BROKEN)} problems found" in output
    lines = {int(n) for n in re.findall(r"all\.yaml:(\d+): CeleryWorkerPool", output)}
    assert len(lines) == len(BROKEN), "each document is named by the line it starts on"


def test_validate_names_the_line_of_a_yaml_syntax_error(tmp_path: Path) -> None:
    code, output = run("validate", str(write(tmp_path / "bad.yaml", "spec:\n  queues: [a\n")))
    assert code == 2
    assert re.search(r"bad\.yaml:3:1: not valid YAML", output), output


@pytest.mark.parametrize("content", ["- a\n- b\n", "just text\n", "42\n"])
def test_validate_refuses_a_document_that_is_not_a_mapping(content: str, tmp_path: Path) -> None:
    code, output = run("validate", str(write(tmp_path / "odd.yaml", content)))
    assert code == 2
    assert "odd.yaml:1: a manifest must be a mapping" in output


def test_validate_reads_directories_and_stdin() -> None:
    code, output = run("validate", str(ROOT / "examples"), "-", stdin=MANAGED.read_text())
    assert code == 0, output
    assert "<stdin>: CeleryWorkerPool emails is valid" in output
    assert "rabbitmq-adopted-pool.yaml: CeleryWorkerPool reports is valid" in output


def test_validate_refuses_a_zero_rate_the_operator_would_refuse(tmp_path: Path) -> None:
    document = mutate("spec.limits.rateLimits", {"shop.tasks.send": "0/m"})
    code, output = run("validate", str(write(tmp_path / "pool.yaml", document)))
    assert code == 2
    assert "Celery reads 0 as no limit" in output


def test_every_command_takes_dash_h() -> None:
    assert isinstance(main, click.Group)
    for name in [None, *main.commands]:
        code, output = run(*([name] if name else []), "-h")
        assert code == 0 and "Usage:" in output, name


def test_plan_refuses_a_zero_duration() -> None:
    code, output = run("plan", "--arrival", "10/m", "--duration", "0s", "--concurrency", "4")
    assert code == 2
    assert "--duration" in output and "more than 0" in output


def test_plan_says_when_max_replicas_caps_it() -> None:
    code, output = run("plan", "--arrival", "1000000/s", "--duration", "1s", "--concurrency", "4")
    assert code == 0
    assert "ceil(1.25e+06 / 4) = 312500" in output
    assert "capped         at maxReplicas 10000" in output


def test_simulate_refuses_a_fixed_pool_of_zero() -> None:
    code, output = run("simulate", "--scenario", "steady", "--policy", "fixed:0")
    assert code == 2
    assert "fixed:N takes 1 to 10000 workers" in output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the trace holds no tasks"),
        ("timestamp,task,duration\n", "the trace holds no tasks"),
        ("timestamp,task,duration\n1,a,2\n2,b\n", "line 3: expected `timestamp,task,duration`"),
        ("1,a,nan\n", "line 1: expected"),
        ("1,a,-3\n", "line 1: a duration lies between 0"),
        ("0,a,1\n1e9,b,1\n", "the trace spans more than 7 days"),
    ],
)
def test_simulate_names_what_is_wrong_with_a_trace(content: str, message: str, tmp_path: Path) -> None:
    trace = write(tmp_path / "trace.csv", content)
    code, output = run("simulate", "--trace", str(trace), "--pool", str(MANAGED))
    assert code == 2
    assert f"{trace}: {message}" in output, output


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed here")
def test_simulate_checks_for_matplotlib_before_running(tmp_path: Path) -> None:
    code, output = run("simulate", "--scenario", "long", "--plot", str(tmp_path / "chart.png"))
    assert code == 2
    assert "--plot needs matplotlib" in output
    assert "oracle" not in output, "the run must not happen first"


def test_local_refuses_an_adopted_pool_before_connecting() -> None:
    # Port 1 has no broker: reaching it would be a different error, after a timeout.
    code, output = run("local", str(ADOPTED), "--broker", "amqp://127.0.0.1:1//")
    assert code == 2
    assert "adopts Deployment reports-worker (scaleTargetRef)" in output


def test_local_refuses_a_broker_url_of_another_kind() -> None:
    code, output = run("local", str(MANAGED), "--broker", "http://user:s3cret@host")
    assert code == 2
    assert "--broker" in output and "s3cret" not in output


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = str(write(tmp_path / "bad.yaml", "a: [1\n"))
    result = CliRunner().invoke(main, ["--debug", "simulate", "--trace", bad, "--pool", bad])
    assert result.exit_code == 1 and result.exc_info is not None
    assert "not valid YAML" in str(result.exception)


def test_crd_has_no_anchors_and_is_the_committed_file() -> None:
    code, output = run("crd")
    assert code == 0
    assert "&id" not in output and "*id" not in output
    assert output == CRD_FILE.read_text()


def test_local_asks_for_the_credentials_a_pool_reads_from_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    document = yaml.safe_load(MANAGED.read_text())
    document["spec"]["broker"] = {
        "url": "redis://127.0.0.1:6379/15",
        "passwordFrom": {"secretKeyRef": {"name": "redis-login", "key": "password"}},
    }
    monkeypatch.delenv("CELERY_BROKER_PASSWORD", raising=False)
    code, output = run("local", str(write(tmp_path / "pool.yaml", document)))
    assert code == 2
    assert "CELERY_BROKER_PASSWORD" in output and "--broker" in output


TLS_REF = {"secretKeyRef": {"name": "redis-tls", "key": "k"}}


@pytest.mark.parametrize(
    ("tls", "broker", "given", "said"),
    [
        ({"caFrom": TLS_REF}, "rediss://127.0.0.1:1/0", (), "--broker-ca, --broker-cert and --broker-key"),
        (None, "rediss://127.0.0.1:1/0", ("--broker-cert",), "together"),
        (None, "redis://127.0.0.1:1/0", ("--broker-ca",), "rediss://"),
        (None, "rediss://127.0.0.1:1/0?ssl_cert_reqs=none", ("--broker-ca",), "one way, not both"),
    ],
    ids=["tls from Secrets without files", "cert without key", "plain redis", "ssl_* and files"],
)
def test_local_checks_the_tls_files_before_connecting(
    tls: dict[str, Any] | None, broker: str, given: tuple[str, ...], said: str, tmp_path: Path
) -> None:
    document = yaml.safe_load(MANAGED.read_text())
    document["spec"]["broker"] = {"url": "rediss://127.0.0.1:1/0", **({"tls": tls} if tls else {})}
    pem = write(tmp_path / "any.pem", "not used: refused before connecting")
    files = [arg for flag in given for arg in (flag, str(pem))]
    code, output = run("local", str(write(tmp_path / "pool.yaml", document)), "--broker", broker, *files)
    assert (code, said in output) == (2, True), output
