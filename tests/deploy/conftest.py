"""promtool, Prometheus and helm for the chart's tests, each built from its Go module before the first
test that needs it (tests.support.go_tool)."""

import pytest

from tests.support.helm import HELM, helm_bin  # noqa: F401  (fixture)
from tests.support.prometheus import PROMETHEUS, prometheus_bin, promtool  # noqa: F401  (fixtures)


def pytest_collection_finish(session: pytest.Session) -> None:
    PROMETHEUS.ensure_before_tests(session)
    HELM.ensure_before_tests(session)
