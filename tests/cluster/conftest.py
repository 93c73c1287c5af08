"""The real control plane's fixtures (tests.support.cluster) for the tests in this folder."""

from tests.support.cluster import (  # noqa: F401  (fixtures and the build-before-tests hook)
    kube_api,
    kube_cluster,
    kube_namespace,
    kubelet,
    pytest_collection_finish,
)
