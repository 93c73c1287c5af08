"""promtool and Prometheus for the chart's alert and dashboard tests (tests.support.prometheus)."""

from tests.support.prometheus import (  # noqa: F401  (fixtures and the build-before-tests hook)
    prometheus_bin,
    promtool,
    pytest_collection_finish,
)
