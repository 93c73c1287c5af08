"""The chaos suite: the operator process as the chart installs it (tests/operator's fixture), on the
real control plane, with a process kubelet running real workers."""

from __future__ import annotations

from tests.operator.conftest import operator

__all__ = ["operator"]
