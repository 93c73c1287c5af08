"""The pure side of telemetry: Celery event dicts in, per-pool numbers out (no broker, no clock)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from celery_worker_operator.naming import pool_of
from celery_worker_operator.telemetry import EventAggregator, EventMonitor, unbatch
from celery_worker_operator.telemetry.aggregator import MAX_TASK_NAMES

T0 = 1_000_000.0
_ids = itertools.count()


def lifecycle(
    host: str, at: float, *, name: str = "app.work", wait: float = 0.05, runtime: float = 0.2, failed: bool = False
) -> Iterator[tuple[float, dict[str, object]]]:
    """(arrival time, event) for one task as a worker reports it: received, started, then the outcome."""
    task = f"task-{next(_ids)}"
    yield at, {"type": "task-received", "hostname": host, "uuid": task, "name": name, "timestamp": at}
    yield at + wait, {"type": "task-started", "hostname": host, "uuid": task, "timestamp": at + wait}
    end = at + wait + runtime
    outcome = {"type": "task-failed"} if failed else {"type": "task-succeeded", "runtime": runtime}
    yield end, {**outcome, "hostname": host, "uuid": task, "timestamp": end}


def beat(host: str, at: float, *, active: int = 0, processed: int = 0, freq: float = 2.0) -> dict[str, object]:
    counters = {"freq": freq, "active": active, "processed": processed}
    return {"type": "worker-heartbeat", "hostname": host, "timestamp": at, **counters}


def feed_all(aggregator: EventAggregator, timed: list[tuple[float, dict[str, object]]]) -> None:
    for now, event in sorted(timed, key=lambda pair: pair[0]):
        aggregator.feed(event, now)


def steady(
    host: str, rate: float, seconds: float, *, name: str = "app.work", runtime: float = 0.2
) -> list[tuple[float, dict[str, object]]]:
    """`rate` tasks per second for `seconds`, each a full lifecycle on `host`."""
    count = int(rate * seconds)
    return [pair for i in range(count) for pair in lifecycle(host, T0 + i / rate, name=name, runtime=runtime)]


def test_a_steady_stream_gives_its_rates_service_time_and_wait() -> None:
    aggregator = EventAggregator(window=10.0, buckets=20)
    aggregator.observe_from(T0)
    feed_all(aggregator, steady("orders@pod-1", rate=10, seconds=20))
    telemetry = aggregator.snapshot("orders", T0 + 20)
    assert telemetry.arrival_rate == pytest.approx(10, rel=0.05)
    assert telemetry.completion_rate == pytest.approx(10, rel=0.05)
    assert telemetry.failure_rate == 0
    assert telemetry.service_time_mean == pytest.approx(0.2)
    assert telemetry.service_time_p95 == pytest.approx(0.2)
    assert telemetry.wait_mean == pytest.approx(0.05)
    assert telemetry.sent_wait_mean is None  # no client sent task-sent
    assert telemetry.task_events is True
    assert set(telemetry.tasks) == {"app.work"}
    assert telemetry.tasks["app.work"].completed == telemetry.completed


def test_early_rates_divide_by_the_time_watched_not_the_whole_window() -> None:
    aggregator = EventAggregator(window=60.0)
    aggregator.observe_from(T0)
    feed_all(aggregator, steady("orders@pod-1", rate=2, seconds=5))
    telemetry = aggregator.snapshot("orders", T0 + 5)
    assert telemetry.observed_seconds == pytest.approx(5)
    assert telemetry.arrival_rate == pytest.approx(2, rel=0.05)


def test_a_burst_leaves_the_recent_rate_long_before_the_windowed_one() -> None:
    aggregator = EventAggregator(window=60.0)
    aggregator.observe_from(T0)
    burst = [pair for i in range(200) for pair in lifecycle("orders@pod-1", T0 + i / 100)]
    trickle = [pair for i in range(60) for pair in lifecycle("orders@pod-1", T0 + 2 + i / 2)]
    feed_all(aggregator, sorted(burst + trickle, key=lambda pair: pair[0]))
    telemetry = aggregator.snapshot("orders", T0 + 32)
    assert telemetry.arrival_rate == pytest.approx((200 + 60) / 32, rel=0.05)
    assert telemetry.arrival_rate_recent == pytest.approx(2, rel=0.1)


def test_old_events_slide_out_of_the_window() -> None:
    aggregator = EventAggregator(window=10.0)
    feed_all(aggregator, steady("orders@pod-1", rate=10, seconds=5))
    later = aggregator.snapshot("orders", T0 + 60)
    assert (later.arrival_rate, later.completed, later.service_time_mean) == (0, 0, None)


def test_failures_count_and_their_run_time_comes_from_task_started() -> None:
    aggregator = EventAggregator(window=10.0)
    feed_all(aggregator, [*lifecycle("orders@pod-1", T0, runtime=0.5, failed=True), *lifecycle("orders@pod-1", T0 + 1)])
    telemetry = aggregator.snapshot("orders", T0 + 2)
    assert telemetry.completed == 2
    assert (telemetry.failure_rate, telemetry.completion_rate) == (pytest.approx(1 / 2), pytest.approx(2 / 2))
    assert telemetry.service_time_mean == pytest.approx((0.5 + 0.2) / 2)


def test_p95_is_the_95th_percentile_of_many_run_times() -> None:
    aggregator = EventAggregator(window=60.0)
    timed = [pair for i in range(1, 1001) for pair in lifecycle("p@w", T0 + i * 0.05, runtime=i / 1000)]
    feed_all(aggregator, timed)
    assert aggregator.snapshot("p", T0 + 51).service_time_p95 == pytest.approx(0.95, abs=0.03)


def test_p95_weights_a_busy_second_above_a_quiet_one() -> None:
    """1,000 fast tasks in one bucket and 10 slow ones in another: 1 % are slow, so the p95 is fast."""
    aggregator = EventAggregator(window=60.0, buckets=30)
    fast = [pair for i in range(1000) for pair in lifecycle("p@w", T0 + i / 2000, runtime=0.001, wait=0)]
    slow = [pair for i in range(10) for pair in lifecycle("p@w", T0 + 10 + i / 100, runtime=1.0, wait=0)]
    feed_all(aggregator, fast + slow)
    telemetry = aggregator.snapshot("p", T0 + 20)
    assert telemetry.service_time_p95 == pytest.approx(0.001)
    assert telemetry.service_time_mean == pytest.approx((1000 * 0.001 + 10) / 1010)


def test_two_pools_on_one_broker_never_mix() -> None:
    aggregator = EventAggregator(window=10.0)
    feed_all(aggregator, steady("fast@pod-1", rate=10, seconds=5, runtime=0.01, name="app.fast"))
    feed_all(aggregator, steady("slow@pod-1", rate=1, seconds=5, runtime=2.0, name="app.slow"))
    aggregator.feed(beat("slow@pod-2", T0 + 5, active=2), T0 + 5)
    fast, slow = aggregator.snapshot("fast", T0 + 8), aggregator.snapshot("slow", T0 + 8)
    assert (fast.completed, slow.completed) == (50, 5)
    assert (fast.service_time_mean, slow.service_time_mean) == (pytest.approx(0.01), pytest.approx(2.0))
    assert (set(fast.tasks), set(slow.tasks)) == ({"app.fast"}, {"app.slow"})
    assert (set(fast.workers), set(slow.workers)) == ({"fast@pod-1"}, {"slow@pod-1", "slow@pod-2"})
    assert (fast.busy_slots, slow.busy_slots) == (0, 2)
    assert aggregator.pools() == ["fast", "slow"]


def test_an_unknown_pool_has_no_numbers() -> None:
    aggregator = EventAggregator()
    telemetry = aggregator.snapshot("nobody", T0)
    assert (telemetry.arrival_rate, telemetry.live_workers, telemetry.task_events) == (None, 0, None)
    assert telemetry.workers == telemetry.tasks == {}


def test_task_sent_counts_for_the_pool_that_consumes_its_queue_and_gives_the_whole_wait() -> None:
    aggregator = EventAggregator(window=10.0)
    aggregator.observe_from(T0)
    for i in range(20):  # 20 sent to the pool's queue, of which only the first 5 reached a worker yet
        sent = {"type": "task-sent", "hostname": "gen1@web", "uuid": f"s{i}", "name": "app.work", "queue": "orders-q"}
        aggregator.feed({**sent, "timestamp": T0 + i * 0.1}, T0 + i * 0.1)
    for i in range(5):
        worker = {"hostname": "orders@pod-1", "uuid": f"s{i}"}
        aggregator.feed({**worker, "type": "task-received", "name": "app.work", "timestamp": T0 + 3}, T0 + 3)
        aggregator.feed({**worker, "type": "task-started", "timestamp": T0 + 3.5}, T0 + 3.5)
    with_queue = aggregator.snapshot("orders", T0 + 4, queues=["orders-q"])
    assert with_queue.arrival_rate == pytest.approx(20 / 4)
    assert with_queue.tasks["app.work"].arrival_rate == pytest.approx(20 / 4)
    assert with_queue.wait_mean == pytest.approx(0.5)
    assert with_queue.sent_wait_mean == pytest.approx(3.5 - 0.2)  # sent at 0, .1, .2, .3, .4
    assert aggregator.snapshot("orders", T0 + 4).arrival_rate == pytest.approx(5 / 4)  # received only
    assert "gen1" not in aggregator.pools()  # a client is not a worker


@pytest.mark.parametrize(
    ("events", "at", "online"),
    [
        ([beat("p@w", T0, freq=2.0)], T0 + 3.9, True),
        ([beat("p@w", T0, freq=2.0)], T0 + 4.1, False),  # two heartbeats missed
        ([beat("p@w", T0, freq=1.0)], T0 + 2.1, False),
        ([beat("p@w", T0), {"type": "worker-offline", "hostname": "p@w"}], T0 + 0.1, False),
        ([beat("p@w", T0), {"type": "worker-offline", "hostname": "p@w"}, beat("p@w", T0 + 1)], T0 + 1, True),
        ([{"type": "worker-online", "hostname": "p@w", "freq": 2.0, "active": 0, "processed": 0}], T0, True),
        ([{"type": "worker-heartbeat", "hostname": "p@w", "freq": 5}], T0 + 9.9, True),  # a wakeup reply
    ],
)
def test_liveness_follows_heartbeats(events: list[dict[str, object]], at: float, online: bool) -> None:
    aggregator = EventAggregator()
    for i, event in enumerate(events):
        aggregator.feed(event, min(T0 + i * 0.5, at))
    assert aggregator.snapshot("p", at).workers["p@w"].online is online


def test_a_wakeup_reply_keeps_the_workers_real_interval_and_counters() -> None:
    aggregator = EventAggregator()
    aggregator.feed(beat("p@w", T0, active=2, processed=7, freq=1.0), T0)
    aggregator.feed({"type": "worker-heartbeat", "hostname": "p@w", "freq": 5}, T0 + 0.5)
    worker = aggregator.snapshot("p", T0 + 0.5).workers["p@w"]
    assert (worker.freq, worker.active, worker.processed, worker.last_heartbeat) == (1.0, 2, 7, T0 + 0.5)


def test_a_worker_is_first_heard_at_its_first_event_and_watching_began_before() -> None:
    aggregator = EventAggregator()
    aggregator.observe_from(T0)
    aggregator.feed({"type": "worker-online", "hostname": "p@w", "freq": 2.0, "active": 0, "processed": 0}, T0 + 3)
    aggregator.feed(beat("p@w", T0 + 5), T0 + 5)
    telemetry = aggregator.snapshot("p", T0 + 5)
    assert (telemetry.watching_since, telemetry.workers["p@w"].first_heard) == (T0, T0 + 3)
    aggregator.observe_from(T0 + 30)  # the stream came back after a cut: what was said meanwhile is lost
    telemetry = aggregator.snapshot("p", T0 + 31)
    assert (telemetry.watching_since, telemetry.observed_seconds) == (T0 + 30, 31.0)


def test_busy_slots_and_live_workers_count_online_workers_only() -> None:
    aggregator = EventAggregator()
    aggregator.feed(beat("p@a", T0, active=2), T0)
    aggregator.feed(beat("p@b", T0 + 5, active=1), T0 + 5)
    telemetry = aggregator.snapshot("p", T0 + 5)
    assert (telemetry.busy_slots, telemetry.live_workers) == (1, 1)


def test_without_task_events_heartbeats_give_throughput_and_service_time() -> None:
    """Workers without -E: 2 busy slots and 4 tasks/s in heartbeats mean 0.5 s per task (Little's law)."""
    aggregator = EventAggregator(window=30.0)
    for i in range(10):
        aggregator.feed(beat("plain@pod", T0 + i * 2, active=2, processed=8 * i), T0 + i * 2)
    telemetry = aggregator.snapshot("plain", T0 + 18)
    assert telemetry.task_events is False
    assert telemetry.workers["plain@pod"].task_events is False
    assert telemetry.completion_rate == pytest.approx(4.0)
    assert telemetry.service_time_mean == pytest.approx(0.5)
    assert (telemetry.arrival_rate, telemetry.service_time_p95, telemetry.wait_mean) == (None, None, None)


def test_an_idle_worker_gives_no_verdict_on_task_events() -> None:
    aggregator = EventAggregator()
    for i in range(5):
        aggregator.feed(beat("idle@pod", T0 + i * 2, processed=3), T0 + i * 2)
    assert aggregator.snapshot("idle", T0 + 8).task_events is None


def test_in_flight_tasks_are_capped_and_expire() -> None:
    aggregator = EventAggregator(in_flight_ttl=30.0, max_in_flight=1000)
    for i in range(5000):  # received, never finished: a lost worker, or a monitor that joined late
        event = {"type": "task-received", "hostname": "p@w", "uuid": f"t{i}", "name": "a", "timestamp": T0}
        aggregator.feed(event, T0 + i / 1000)
    assert aggregator.in_flight <= 1000
    aggregator.feed(beat("p@w", T0 + 100), T0 + 100)
    assert aggregator.in_flight == 0


def test_gone_workers_and_idle_pools_are_forgotten() -> None:
    aggregator = EventAggregator(window=10.0)
    feed_all(aggregator, [*lifecycle("old@pod", T0), (T0, beat("old@pod", T0))])
    aggregator.feed(beat("new@pod", T0 + 30), T0 + 30)
    assert aggregator.pools() == ["new"]


def test_a_task_finishing_after_its_record_expired_still_counts_for_the_pool() -> None:
    aggregator = EventAggregator(window=10.0)
    done = {"type": "task-succeeded", "hostname": "p@w", "uuid": "unknown", "runtime": 1.5, "timestamp": T0}
    aggregator.feed(done, T0)
    telemetry = aggregator.snapshot("p", T0 + 1)
    assert (telemetry.completed, telemetry.service_time_mean, telemetry.tasks) == (1, 1.5, {})


def test_unbatch_reads_single_and_task_multi_bodies() -> None:
    single = {"type": "worker-heartbeat"}
    assert unbatch(single) == (single,)
    assert unbatch([single, single]) == [single, single]
    with pytest.raises(TypeError):
        unbatch("task-received")


@pytest.mark.parametrize(
    ("hostname", "pool"), [("orders@pod-7", "orders"), ("orders@pod@x", "orders"), ("bare", "bare")]
)
def test_a_worker_belongs_to_the_pool_before_the_first_at(hostname: str, pool: str) -> None:
    assert pool_of(hostname) == pool


def test_a_monitor_never_shows_its_broker_password() -> None:
    monitor = EventMonitor("amqp://user:s3cret@rabbit:5672//")  # not started: no I/O
    assert "s3cret" not in monitor.name and "rabbit:5672" in monitor.name


def test_an_unreadable_event_is_counted_and_the_rest_of_its_message_still_counts() -> None:
    aggregator = EventAggregator(window=10.0)
    broken = {"type": "task-succeeded", "hostname": "p@w"}  # no uuid
    events = [broken, *(event for _, event in lifecycle("p@w", T0))]
    assert aggregator.feed_many(events, T0) == 1
    assert aggregator.snapshot("p", T0 + 1).completed == 1
    with pytest.raises(KeyError):
        aggregator.feed(broken, T0)


def test_totals_count_every_task_event_since_watching_began_with_runtime_and_wait_histograms() -> None:
    aggregator = EventAggregator(window=10.0)
    timed = [pair for i in range(30) for pair in lifecycle("orders@pod-1", T0 + i, runtime=0.3, failed=i % 10 == 0)]
    retried = {"type": "task-retried", "hostname": "orders@pod-1", "uuid": "task-r", "timestamp": T0 + 31}
    feed_all(aggregator, [*timed, (T0 + 30.5, {**timed[0][1], "uuid": "task-r"}), (T0 + 31, retried)])
    totals = aggregator.snapshot("orders", T0 + 40).totals["app.work"]  # long after the window: totals stay
    assert (totals.received, totals.started, totals.succeeded, totals.failed, totals.retried) == (31, 30, 27, 3, 1)
    assert totals.runtime.counts[-1] == 30, "failed runs hold a slot too: their run time is in the histogram"
    le_025, le_05 = (totals.runtime.counts[totals.runtime.bounds.index(b)] for b in (0.25, 0.5))
    assert (le_025, le_05) == (0, 30)
    assert totals.runtime.total == pytest.approx(27 * 0.3 + 3 * 0.3)
    assert totals.wait.counts[-1] == 30 and totals.wait.total == pytest.approx(30 * 0.05)


def test_task_names_past_the_cap_add_up_under_other() -> None:
    aggregator = EventAggregator(window=10.0)
    names = [f"app.task{n}" for n in range(MAX_TASK_NAMES + 50)]
    feed_all(aggregator, [pair for i, name in enumerate(names) for pair in lifecycle("orders@pod-1", T0, name=name)])
    totals = aggregator.snapshot("orders", T0 + 1).totals
    assert len(totals) == MAX_TASK_NAMES + 1
    assert totals["other"].succeeded == 50
    assert sum(t.succeeded for t in totals.values()) == len(names)


def test_a_legacy_worker_counts_for_the_first_pool_that_claims_it_and_never_for_another() -> None:
    aggregator = EventAggregator(window=10.0, buckets=10)
    aggregator.observe_from(T0)
    feed_all(aggregator, [(T0 + 1, beat("orders@a1", T0 + 1, active=2)), (T0 + 1, beat("orders@b1", T0 + 1))])
    feed_all(aggregator, [(T0 + 1, beat("orders.team-a@a2", T0 + 1, active=1))])
    mine = aggregator.snapshot("orders.team-a", T0 + 2, claim={"orders@a1"})
    assert (set(mine.workers), mine.busy_slots) == ({"orders@a1", "orders.team-a@a2"}, 3)
    theirs = aggregator.snapshot("orders.team-b", T0 + 2, claim={"orders@a1", "orders@b1"})
    assert set(theirs.workers) == {"orders@b1"}, "a worker claimed by team-a is not team-b's"
    feed_all(aggregator, list(lifecycle("orders@a1", T0 + 3)))
    assert aggregator.snapshot("orders.team-a", T0 + 4).completed == 1, "its later tasks count for its pool"
    assert aggregator.snapshot("orders.team-b", T0 + 4).completed == 0
