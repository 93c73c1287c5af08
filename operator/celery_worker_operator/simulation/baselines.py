"""Scaling policies the simulator can run: ours, a KEDA-style baseline and a fixed pool. Pure.

The KEDA baseline is KEDA's Redis-list / RabbitMQ queue-length scaler behind the HPA, with their
defaults: the HPA syncs every 15 s and wants ceil(queue length / target per replica) (ready
messages only: prefetched ones are invisible to it) within a 10 % tolerance, grows by
max(4 pods, 100 %) per sync, shrinks to the highest recommendation of the last 300 s, and the
ReplicaSet removes the youngest pods, busy or not. KEDA itself polls every 30 s to activate a
pool from zero and returns it to zero after a 300 s cooldown with an empty queue.

`KedaScaler.tuned()` is the same scaler as a careful user sets it up: KEDA polling and the HPA
sync every 5 s, a 60 s scale-down window and a 60 s cooldown.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field

from ..policy import Decision, Observation, Recommendation, decide, remember, wakes_early
from ..spec import AutoscalingSpec
from .engine import Removal

HPA_SYNC_SECONDS = 15.0
HPA_TOLERANCE = 0.1
HPA_DOWN_WINDOW = 300.0
KEDA_POLLING_SECONDS = 30.0
KEDA_COOLDOWN_SECONDS = 300.0
TUNED_POLL_SECONDS = 5.0
TUNED_WINDOW_SECONDS = 60.0


@dataclass
class OurScaler:
    """The operator's policy, with its history, as the reconciler runs it."""

    spec: AutoscalingSpec
    concurrency: int
    name: str = "ours"
    removal: Removal = "idle_only"
    history: tuple[Recommendation, ...] = ()
    last: Decision | None = None
    tally: DecisionTally = field(default_factory=lambda: DecisionTally())

    @property
    def poll_seconds(self) -> float:
        return self.spec.poll_seconds

    def initial_replicas(self) -> int:
        return self.spec.min_replicas

    def desired(self, obs: Observation) -> int:
        self.last = decide(obs, self.spec, self.concurrency, self.history)
        self.history = remember(self.history, self.last, obs.time, self.spec)
        self.tally.add(self.last, self._step_down())
        return self.last.replicas

    def wakes(self, waiting: int) -> bool:
        """As the pool loop does between passes."""
        return self.last is not None and wakes_early(waiting, self.last, self.spec)

    def explain(self) -> str:
        return self.tally.describe()

    def _step_down(self) -> int:
        current = self.last.terms.current if self.last else 0
        down = self.spec.scale_down
        return max(down.max_step_pods, math.floor(current * down.max_step_percent / 100))


@dataclass
class DecisionTally:
    """How often each term of the policy drove a decision over a run: `simulate` prints it."""

    passes: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    rates: Counter[str] = field(default_factory=Counter)
    drain_shortened: int = 0  # passes whose backlog had less than the target left (its oldest waited)
    startup_shortened: int = 0  # passes whose backlog needed new workers and had less their start-up left
    idle_steps: int = 0  # scale-downs past the step limit: measured-idle workers went at once

    def add(self, decision: Decision, step_down: int) -> None:
        terms = decision.terms
        self.passes += 1
        self.kinds[decision.kind] += 1
        if terms.rate_source:
            self.rates[terms.rate_source] += 1
        if terms.drain_seconds is not None and terms.backlog and terms.oldest_wait:
            self.drain_shortened += 1
        self.startup_shortened += bool(terms.startup)
        self.idle_steps += terms.current - decision.replicas > step_down

    def describe(self) -> str:
        kinds = ", ".join(f"{kind} {count}" for kind, count in self.kinds.most_common() if kind != "Hold")
        rated = sum(self.rates.values()) or 1
        return (
            f"{self.passes} passes ({kinds or 'no changes'}); steady term from the recent rate in "
            f"{self.rates['recent'] / rated:.0%}, the minute's in {self.rates['window'] / rated:.0%}; "
            f"backlog given less than the target (its oldest had waited) in {self.drain_shortened}, "
            f"less the new workers' start-up in {self.startup_shortened}; "
            f"idle workers removed past the step limit in {self.idle_steps}"
        )


@dataclass
class KedaScaler:
    """KEDA's queue-length scaler with its and the HPA's default behaviour (or `tuned()`)."""

    min_replicas: int
    max_replicas: int
    target_per_replica: float
    name: str = "keda"
    removal: Removal = "youngest"
    poll_seconds: float = HPA_SYNC_SECONDS
    down_window: float = HPA_DOWN_WINDOW
    activation_seconds: float = KEDA_POLLING_SECONDS
    cooldown_seconds: float = KEDA_COOLDOWN_SECONDS
    recent: deque[tuple[float, int]] = field(default_factory=deque)
    last_active: float = 0.0
    last_keda_poll: float = -math.inf

    @classmethod
    def tuned(cls, min_replicas: int, max_replicas: int, target_per_replica: float) -> KedaScaler:
        """A 5 s poll (KEDA and HPA), a 60 s down window and cooldown: the fastest a user would set."""
        return cls(
            min_replicas,
            max_replicas,
            target_per_replica,
            name="keda-tuned",
            poll_seconds=TUNED_POLL_SECONDS,
            down_window=TUNED_WINDOW_SECONDS,
            activation_seconds=TUNED_POLL_SECONDS,
            cooldown_seconds=TUNED_WINDOW_SECONDS,
        )

    def initial_replicas(self) -> int:
        return self.min_replicas

    def desired(self, obs: Observation) -> int:
        ready_messages = sum(q.depth or 0 for q in obs.queues)
        current = obs.current_replicas
        if ready_messages > 0:
            self.last_active = obs.time
        if current == 0:
            return self._activate(obs.time, ready_messages)
        if self.min_replicas == 0 and obs.time - self.last_active >= self.cooldown_seconds:
            return 0
        return self._hpa(obs.time, current, ready_messages)

    def _activate(self, now: float, ready_messages: int) -> int:
        if now - self.last_keda_poll < self.activation_seconds - self.poll_seconds / 2:  # nearest sync: jitter-proof
            return 0
        self.last_keda_poll = now
        return 1 if ready_messages > 0 else 0

    def _hpa(self, now: float, current: int, metric: int) -> int:
        ratio = metric / (self.target_per_replica * current)
        wanted = current if abs(ratio - 1) <= HPA_TOLERANCE else math.ceil(metric / self.target_per_replica)
        wanted = min(max(wanted, 1, self.min_replicas), self.max_replicas)
        self.recent.append((now, wanted))
        while self.recent and now - self.recent[0][0] >= self.down_window:
            self.recent.popleft()
        if wanted < current:
            return max(wanted, min(current, max(r for _, r in self.recent)))
        return min(wanted, current + max(4, current))

    def wakes(self, waiting: int) -> bool:
        return False  # KEDA and the HPA look only at their polls

    def explain(self) -> str:
        return ""


@dataclass
class FixedScaler:
    """A pool that never changes size: what people run without an autoscaler."""

    replicas: int
    removal: Removal = "youngest"
    poll_seconds: float = 60.0

    @property
    def name(self) -> str:
        return f"fixed:{self.replicas}"

    def initial_replicas(self) -> int:
        return self.replicas

    def desired(self, obs: Observation) -> int:
        return self.replicas

    def wakes(self, waiting: int) -> bool:
        return False

    def explain(self) -> str:
        return ""
