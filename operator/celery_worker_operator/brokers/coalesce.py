"""Every pool of a broker measured together: one probe round trip for all of them, at most every `max_age`.

Each pool that may still grow checks its queues every second between polls, and each pass measures them
again: with hundreds of pools on one broker that is hundreds of round trips a second, one per pool.
`CoalescingProbe` answers from numbers at most `max_age` old; when a queue asked for is older, it
measures every queue some pool asked for lately and is due too, in one `stats` call (one pipelined
round trip on Redis), so the broker sees about one probe per `max_age` whatever the number of pools.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from celery_worker_operator.brokers.base import QueueProbe, QueueStats
from celery_worker_operator.policy import WAKE_CHECK_SECONDS

FRESH_SECONDS = WAKE_CHECK_SECONDS  # numbers this young answer for every pool: each check between passes sees new ones
INTEREST_SECONDS = 5.0  # a queue nobody asked about this long (its pool stopped checking, or is gone) is dropped


class CoalescingProbe:
    """A QueueProbe over another that measures the queues of all its callers at once."""

    def __init__(
        self, probe: QueueProbe, *, max_age: float = FRESH_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._probe, self._max_age, self._clock = probe, max_age, clock
        self._lock = threading.Lock()
        self._measured: dict[str, tuple[float, QueueStats]] = {}  # queue -> (when, numbers)
        self._asked: dict[str, float] = {}  # queue -> when a caller last asked for it

    def stats(self, queues: Iterable[str]) -> dict[str, QueueStats]:
        names = list(dict.fromkeys(queues))
        with self._lock:
            now = self._clock()
            self._asked.update(dict.fromkeys(names, now))
            if any(self._stale(name, now) for name in names):
                self._asked = {q: at for q, at in self._asked.items() if now - at < INTEREST_SECONDS}
                due = [q for q in self._asked if self._stale(q, now)]
                measured = self._probe.stats(due)  # BrokerUnavailable goes to the caller; nothing is kept
                self._measured = {q: self._measured[q] for q in self._asked if q in self._measured}
                self._measured.update((q, (now, measured[q])) for q in due)
            return {name: self._measured[name][1] for name in names}

    def close(self) -> None:
        with self._lock:
            self._measured, self._asked = {}, {}
        self._probe.close()

    def _stale(self, queue: str, now: float) -> bool:
        measured = self._measured.get(queue)
        return measured is None or now - measured[0] >= self._max_age
