"""Whatever a user throws at the command line, the answer is a message, never a traceback.

Hypothesis generates malformed YAML, documents of the wrong shape (a valid pool with any node
replaced by anything), random CSV traces and random option values for every command. Each run
must end with exit code 0, or 2 and an `Error:` line; exit code 1 would be an internal error.
Every command is covered; `run`, `demo` and `local` only with input that fails before connecting.
"""

from __future__ import annotations

import contextlib
import copy
import string
import tempfile
from pathlib import Path
from typing import Any

import click
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_worker_operator.cli import main
from tests.unit.test_spec import BASE

ROOT = Path(__file__).resolve().parents[2]
MANAGED = str(ROOT / "examples" / "redis-managed-pool.yaml")
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += _paths(child, (*prefix, index))
    return found


PATHS = _paths(BASE)[1:]


def _replace(document: Any, path: tuple[Any, ...], value: Any) -> None:
    """Set the node at `path` when an earlier replacement left the way there intact."""
    *parents, last = path
    node = document
    try:
        for part in parents:
            node = node[part]
        node[last] = value
    except (KeyError, IndexError, TypeError):
        return


@st.composite
def wrong_shapes(draw: st.DrawFn) -> str:
    """A valid pool with some of its nodes replaced by any value, dumped as YAML."""
    document = copy.deepcopy(BASE)
    for path in draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=3)):
        _replace(document, path, draw(values))
    return yaml.safe_dump(document)


yaml_texts = st.one_of(
    st.text(max_size=200),
    st.text(alphabet="{}[]:,-&*!|>'\"#%@` \n\tab1", max_size=80),
    values.map(yaml.safe_dump),
    wrong_shapes(),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
)
cells = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6).map(str),
    st.integers(-5, 10**6).map(str),
    st.sampled_from(["nan", "inf", "-1", "", " ", "1e400", "x"]),
    st.text(alphabet=string.printable, max_size=8),
)
csv_traces = st.lists(st.lists(cells, min_size=0, max_size=4).map(",".join), max_size=20).map("\n".join)
words = st.text(max_size=25)


def invoke(*args: str, stdin: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as empty, contextlib.chdir(empty):  # a random `.` is not this repository
        result = CliRunner().invoke(main, list(args), input=stdin)
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args}: {result.exception!r}\n{result.output}")
    assert result.exit_code in (0, 2), f"{args} -> {result.exit_code}:\n{result.output}"
    if result.exit_code == 2:  # a message, or the usage a bare group prints
        assert "Error:" in result.output or result.output.startswith("Usage:"), result.output


def _file(text: str, name: str) -> str:
    directory = Path(tempfile.mkdtemp(prefix="cwo-fuzz-"))
    path = directory / name
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    return str(path)


@FUZZ
@given(yaml_texts)
def test_validate_answers_any_file_and_stdin(text: str) -> None:
    invoke("validate", _file(text, "pool.yaml"))
    invoke("validate", "-", stdin=text)


@FUZZ
@given(yaml_texts, words, words)
def test_local_answers_any_pool_file_before_connecting(text: str, broker: str, name: str) -> None:
    invoke("local", _file(text, "pool.yaml"), "--broker", f"redis://127.0.0.1:1/{broker}", "--name", name)
    invoke("local", _file(text, "pool.yaml"), "--broker", broker)


@FUZZ
@given(csv_traces, yaml_texts)
def test_simulate_answers_any_trace_and_pool(trace: str, pool: str) -> None:
    invoke("simulate", "--trace", _file(trace, "trace.csv"), "--pool", MANAGED)
    invoke("simulate", "--trace", _file(trace, "trace.csv"), "--pool", _file(pool, "pool.yaml"))


@FUZZ
@given(words, words, words, st.integers(-(10**20), 10**20))
def test_simulate_answers_any_option_value(scenario: str, policy: str, startup: str, seed: int) -> None:
    invoke("simulate", "--scenario", scenario, "--policy", policy)
    invoke("simulate", "--scenario", "herd", "--policy", policy, "--startup", startup, "--seed", str(seed))


plan_values = st.one_of(words, st.sampled_from(["0", "0s", "0/m", "1e400", "-1", "9" * 400, "1/d", "3ms"]))


@FUZZ
@given(st.lists(plan_values, min_size=7, max_size=7))
def test_plan_answers_any_option_value(options: list[str]) -> None:
    names = ("--arrival", "--duration", "--concurrency", "--target-wait", "--utilization", "--backlog")
    args = [part for name, value in zip(names, options, strict=False) for part in (name, value)]
    invoke("plan", *args, "--max-replicas", options[-1])


@FUZZ
@given(st.lists(words, max_size=4), st.sampled_from([None, *sorted(main.commands)]))  # type: ignore[attr-defined]
def test_every_command_answers_random_arguments(arguments: list[str], command: str | None) -> None:
    # Only arguments that cannot start a long run: `run` needs a namespace flag, `demo` a broker URL.
    assert isinstance(main, click.Group)
    arguments = [a for a in arguments if a not in main.commands]
    if command in ("run", "demo", "local"):
        arguments = [a for a in arguments if a.startswith("-") and a not in ("--all-namespaces", "-h", "--help")]
        if command == "run":
            arguments = ["--namespace", "a", "--all-namespaces", *arguments]
        if command == "demo":
            arguments = ["--broker", "nope://", *arguments]
    invoke(*([command] if command else []), *arguments)
