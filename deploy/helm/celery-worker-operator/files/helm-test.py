"""`helm test`: the operator answers /healthz, and the API server serves the CeleryWorkerPool CRD,
which the operator's ServiceAccount may list where it works.

Run by the chart's test Pod (templates/tests/operator-answers.yaml) with `python -c`, in the operator's
own image and as its ServiceAccount; standard library only. Prints one line per check; exit 1 on the
first failure, saying what failed.
"""

import json
import os
import ssl
import sys
import urllib.error
import urllib.request

ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
GROUP_VERSION = "celery-operator.dev/v1alpha1"
PLURAL = "celeryworkerpools"


def fetch(url: str, context: ssl.SSLContext | None = None, token: str | None = None) -> bytes:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as error:
        sys.exit(f"FAIL {url}: HTTP {error.code} {error.read()[:300]!r}")
    except OSError as error:
        sys.exit(f"FAIL {url}: {error}")


def api_server() -> str:
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def main() -> None:
    healthz = os.environ["OPERATOR_HEALTHZ_URL"]
    fetch(healthz)
    print(f"ok   the operator answers {healthz}")

    with open(f"{ACCOUNT}/token") as handle:
        token = handle.read().strip()
    context = ssl.create_default_context(cafile=f"{ACCOUNT}/ca.crt")
    base = f"{api_server()}/apis/{GROUP_VERSION}"
    served = {resource["name"] for resource in json.loads(fetch(base, context, token))["resources"]}
    if PLURAL not in served:
        sys.exit(f"FAIL the API server serves {GROUP_VERSION} without {PLURAL}: {sorted(served)}")
    print(f"ok   the API server serves {PLURAL}.{GROUP_VERSION}")

    namespaces = [name for name in os.environ.get("WATCH_NAMESPACES", "").split(",") if name]
    paths = [f"/namespaces/{name}/{PLURAL}" for name in namespaces] or [f"/{PLURAL}"]
    for path in paths:
        fetch(f"{base}{path}?limit=1", context, token)
        print(f"ok   the operator's ServiceAccount lists {path.lstrip('/')}")


if __name__ == "__main__":
    main()
