"""Telemetry from Celery's event stream, split as control/ is: `model` and `window` and
`aggregator` are pure (events and a clock in, numbers out), `monitor` does the broker I/O."""

from .aggregator import EventAggregator, unbatch
from .model import PoolTelemetry, TaskStats, WorkerTelemetry
from .monitor import EventMonitor, TelemetryMonitors

__all__ = [
    "EventAggregator",
    "EventMonitor",
    "PoolTelemetry",
    "TaskStats",
    "TelemetryMonitors",
    "WorkerTelemetry",
    "unbatch",
]
