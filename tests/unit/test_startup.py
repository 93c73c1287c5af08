"""A pool's measured worker start-up: one sample per new member, from its start to its worker's first
event, bounded, the median of the last few."""

from __future__ import annotations

import pytest

from celery_worker_operator.reconciler import sample_startup
from celery_worker_operator.startup import KEPT_SAMPLES, MAX_STARTUP_SECONDS, StartupSamples
from celery_worker_operator.telemetry import PoolTelemetry
from celery_worker_operator.telemetry.model import WorkerTelemetry
from celery_worker_operator.workloads import WorkloadState

T0 = 1_000_000.0  # when the operator began watching the event stream


@pytest.mark.parametrize(
    ("started", "heard", "samples"),
    [
        ({"w1": T0 + 10}, {"w1": T0 + 12.5}, (2.5,)),
        ({"w1": T0 - 1}, {"w1": T0 + 0.5}, ()),  # running before the operator watched: heard late, no sample
        ({"w1": T0 + 10}, {"w1": T0 + 9}, ()),  # heard before its start: clocks disagree
        ({"w1": T0 + 10}, {"w1": T0 + 10 + MAX_STARTUP_SECONDS + 1}, ()),  # heard far too late: a lost stream
        ({"w1": T0 + 10}, {}, ()),  # not heard yet
        ({}, {"w1": T0 + 12}, ()),  # heard, but not a member of the workload (yet, or any more)
        ({"w1": T0 + 10, "w2": T0 + 10}, {"w2": T0 + 14, "w1": T0 + 11}, (1.0, 4.0)),  # in the order heard
    ],
    ids=["a new member", "already running", "negative", "absurdly long", "unheard", "not a member", "two, in order"],
)
def test_a_sample_is_first_heard_minus_started(
    started: dict[str, float], heard: dict[str, float], samples: tuple[float, ...]
) -> None:
    assert StartupSamples().add(started, heard, T0).samples == samples


def test_no_sample_before_the_stream_is_watched() -> None:
    assert StartupSamples().add({"w1": T0 + 10}, {"w1": T0 + 12}, None) == StartupSamples()


def test_each_member_counts_once_and_is_forgotten_when_it_goes() -> None:
    once = StartupSamples().add({"w1": T0 + 10}, {"w1": T0 + 12}, T0)
    again = once.add({"w1": T0 + 10, "w2": T0 + 20}, {"w1": T0 + 12, "w2": T0 + 23}, T0)
    assert (again.samples, again.seen) == ((2.0, 3.0), {"w1", "w2"})
    assert again.add({"w2": T0 + 20}, {"w2": T0 + 23}, T0).seen == {"w2"}


def test_a_refused_member_is_not_looked_at_again() -> None:
    refused = StartupSamples().add({"w1": T0 - 5}, {"w1": T0 + 1}, T0)
    assert (refused.samples, refused.seen) == ((), {"w1"})


def test_the_median_of_the_last_few_is_the_start_up() -> None:
    samples = StartupSamples()
    assert samples.median is None
    for number, seconds in enumerate([30.0, 1.0, 2.0, 9.0, 3.0, 2.5], start=1):
        member = f"w{number}"
        samples = samples.add({member: T0 + 100}, {member: T0 + 100 + seconds}, T0)
    assert samples.samples == (1.0, 2.0, 9.0, 3.0, 2.5)[-KEPT_SAMPLES:]  # the first (30 s) has gone
    assert samples.median == 2.5  # one slow worker moves it little


def test_members_are_matched_to_workers_by_the_hostname_after_the_at() -> None:
    worker = WorkerTelemetry("p.default@p-1", True, 0, 0, T0 + 12, 2.0, None, first_heard=T0 + 12)
    telemetry = PoolTelemetry(
        pool="p.default",
        observed_seconds=12.0,
        task_events=None,
        busy_slots=0,
        live_workers=1,
        workers={worker.hostname: worker},
        tasks={},
        watching_since=T0,
    )
    workload = WorkloadState(1, 1, members=("p-1",), started={"p-1": T0 + 10.5})
    assert sample_startup(StartupSamples(), workload, telemetry).samples == (1.5,)
