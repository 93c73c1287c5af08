"""A "process kubelet" for tests against the real control plane (`tests.support.cluster`).

There is no scheduler and no real kubelet in the tests' cluster. `ProcessKubelet` stands in for both,
for the pods it is given (one namespace, and/or a label selector):

- registers a fake Node (Ready, 127.0.0.1) and binds every unscheduled pod to it through the
  ``pods/binding`` subresource, as the scheduler would;
- runs each container of a pod bound to it as a REAL local process, from the container's own
  ``command`` + ``args`` and ``env``/``envFrom`` (``$(VAR)`` references expanded as the kubelet does,
  ``valueFrom`` fieldRef / secretKeyRef / configMapKeyRef / resourceFieldRef resolved), each in its
  own process group, its output in a log file;
- marks the pod Running and Ready through the status subresource (PodScheduled, Initialized,
  ContainersReady and Ready conditions, running containerStatuses, podIP 127.0.0.1): Ready as soon
  as the process runs, or once ``ready_when(pod, container, output)`` is true (a readiness probe on
  what the process printed, e.g. a celery worker's "ready." line);
- on graceful deletion (``deletionTimestamp`` set) sends SIGTERM to the container's main process
  only (a container runtime signals PID 1, which stops its own children: a Celery worker's warm
  shutdown lets its pool's children finish their tasks), waits up to
  ``deletionGracePeriodSeconds``, then SIGKILL to the whole process group, reports the containers
  terminated and finalizes the pod (delete with ``gracePeriodSeconds=0`` and a uid precondition),
  as a kubelet does;
- a process that exits on its own is reported (terminated, exit code, ``restartCount``) and
  restarted per ``restartPolicy`` (Always, OnFailure, Never) after a short back-off.

No init containers or images, no probes but through ``ready_when`` (``http_readiness`` runs the
container's readinessProbe.httpGet), and no volumes but one kind: the process runs in the test's
environment (the test process's environment plus the pod's env; the test interpreter's folder first
on PATH, so ``python`` and ``celery`` are the venv's). With ``api_server`` (the API server's URL) a
pod gets in-cluster API access as a kubelet gives it: ``KUBERNETES_SERVICE_HOST``/``_PORT`` naming
the API server (no Service routing here), and its ``projected`` volumes (the ServiceAccount admission
plugin's ``kube-api-access-*``: a token bound to the pod from the TokenRequest API, ``ca.crt``, the
namespace) written to files and bind-mounted read-only at their mountPath under /var/run, in a private
mount namespace (``unshare``, root only) over a fresh /run, as a container runtime would. A container
without ``command`` cannot run unless ``command_for`` supplies one. Everything runs in two daemon
threads inside the pytest process; ``close()`` kills every process group it started. Use it as a
context manager (the ``kubelet`` fixture of `tests.support.cluster` does).

Inspection for tests (thread-safe): ``pid(pod)``, ``log(pod)`` (the process's output only, like
``kubectl logs``), ``command(pod)`` (the argv it ran), ``signals(pod)`` (what the kubelet sent:
"SIGTERM", "SIGKILL"), ``exits`` (every process that ended, with its return code), ``running()``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from celery_worker_operator.workloads.lifeline import die_with_parent

ROOT = Path(__file__).resolve().parents[2]
NODE_IP = "127.0.0.1"

Pod = dict[str, Any]
CommandFor = Callable[[Pod, dict[str, Any]], "list[str] | None"]
ReadyWhen = Callable[[Pod, str, str], bool]


class ConfigError(Exception):
    """A container's configuration cannot be resolved (kubelet: CreateContainerConfigError)."""


# ------------------------------------------------------------------------------ $(VAR) expansion


def expand(text: str, mapping: Mapping[str, str]) -> str:
    """Kubelet's `$(VAR)` expansion: defined names are replaced, unknown ones kept as written,
    `$$` is an escaped `$`, and a `$(` without a closing parenthesis is kept as is."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$" or i + 1 == len(text):
            out.append(char)
            i += 1
            continue
        following = text[i + 1]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "(":
            end = text.find(")", i + 2)
            if end == -1:
                out.append(text[i:])
                break
            name = text[i + 2 : end]
            out.append(mapping.get(name, f"$({name})"))
            i = end + 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
_SUFFIX = {
    "": 1.0,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}


def quantity(text: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "1Gi", "2") as a number."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ConfigError(f"invalid quantity {text!r}")
    number, suffix = match.groups()
    if suffix and suffix[0] in "eE":
        return float(number + suffix)
    return float(number) * _SUFFIX[suffix or ""]


def http_readiness(pod: Pod, container: str, output: str) -> bool:
    """A `ready_when` running the container's `readinessProbe.httpGet` against the pod's IP (a named
    port resolved from its ports); a container without that probe is ready once it runs."""
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    probe = spec.get("readinessProbe", {}).get("httpGet")
    if probe is None:
        return True
    port = probe["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in spec.get("ports", []) if p.get("name") == port)
    try:
        with urllib.request.urlopen(f"http://{NODE_IP}:{port}{probe.get('path', '/')}", timeout=1) as response:
            return 200 <= int(response.status) < 400
    except OSError:
        return False


# ------------------------------------------------------------------------------ the kubelet's state


@dataclass
class Exit:
    """One process that ended: which pod and container, its pid, what the kubelet sent it, its code."""

    namespace: str
    pod: str
    uid: str
    container: str
    pid: int
    returncode: int
    signals: list[str]
    log_path: Path


@dataclass
class _Container:
    spec: dict[str, Any]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    restart_count: int = 0
    restart_at: float | None = None  # monotonic time of the next (re)start attempt
    error: str | None = None  # a configuration error: waiting, CreateContainerConfigError
    last_terminated: dict[str, Any] | None = None
    done: bool = False  # exited and not to be restarted
    signals: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)
    ready: bool = False

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class _PodRun:
    pod: Pod
    containers: list[_Container]
    started: str
    terminate_deadline: float | None = None
    finished: bool = False
    conditions: dict[str, tuple[str, str]] = field(default_factory=dict)  # type -> (status, since)
    unreported: bool = False  # the last status write failed: written again on the next tick

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def uid(self) -> str:
        return str(self.pod["metadata"]["uid"])


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _kill_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


# ------------------------------------------------------------------------------ the kubelet


class ProcessKubelet:
    """Binds, runs and terminates the pods of `namespace` (or all namespaces) matching `label_selector`."""

    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        node_name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path = ROOT,
        command_for: CommandFor | None = None,
        restart_backoff: float = 1.0,
        max_restart_backoff: float = 10.0,
        ready_when: ReadyWhen | None = None,
        api_server: str | None = None,
    ) -> None:
        if namespace is None and label_selector is None:
            raise ValueError("give a namespace, a label selector or both: the kubelet must not take every pod")
        self.api, self.core = api, client.CoreV1Api(api)
        self.namespace, self.label_selector = namespace, label_selector
        self.node_name = node_name or f"cwo-process-node-{uuid.uuid4().hex[:6]}"
        self.extra_env, self.cwd, self.command_for = dict(env or {}), str(cwd), command_for
        self.restart_backoff, self.max_restart_backoff = restart_backoff, max_restart_backoff
        # None: a container is Ready once its process runs. Else Ready once ready_when(pod, container
        # name, its log so far) is true: a readiness probe on the process's output (checked every 0.1 s).
        self.ready_when = ready_when
        self.api_server = urllib.parse.urlsplit(api_server) if api_server else None
        self.exits: list[Exit] = []
        self.errors: list[str] = []  # unexpected exceptions in the kubelet's threads
        self._runs: dict[str, _PodRun] = {}  # by pod uid
        self._lock = threading.RLock()
        self._events: queue.Queue[tuple[str, Pod]] = queue.Queue()
        self._stop = threading.Event()
        self._watch_response: Any = None
        self._logs = tempfile.TemporaryDirectory(prefix="cwo-kubelet-")
        self._threads: list[threading.Thread] = []
        self._retries: list[tuple[float, str, Pod]] = []  # (monotonic time, kind, pod)

    # -- lifecycle

    def start(self) -> ProcessKubelet:
        try:
            self._register_node()
        except BaseException:
            self._logs.cleanup()
            raise
        for target, name in ((self._watch_loop, "watch"), (self._work_loop, "work")):
            thread = threading.Thread(target=target, name=f"kubelet-{name}-{self.node_name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stop watching, kill every process group started (SIGKILL), delete the Node."""
        self._stop.set()
        response = self._watch_response
        if response is not None:
            with contextlib.suppress(Exception):
                (getattr(response, "shutdown", None) or response.close)()
        for thread in self._threads:
            thread.join(timeout=10)
        with self._lock:
            for run in self._runs.values():
                for container in run.containers:
                    if container.process is not None:
                        self._reap(run, container, force=True)
        with contextlib.suppress(Exception):  # the API server may be gone already
            self.core.delete_node(self.node_name, _preload_content=False)
        self._logs.cleanup()

    def __enter__(self) -> ProcessKubelet:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    # -- inspection (any thread)

    def pid(self, pod: str, namespace: str | None = None, container: str | None = None) -> int | None:
        """The pid of the pod's running process (first container unless named), or None."""
        with self._lock:
            run = self._find(pod, namespace)
            if run is None:
                return None
            found = self._container(run, container)
            return found.process.pid if found and found.running and found.process else None

    def signals(self, pod: str, namespace: str | None = None, container: str | None = None) -> list[str]:
        """Signals the kubelet sent to the pod's process (group), in order (over restarts too)."""
        with self._lock:
            run = self._find(pod, namespace)
            found = self._container(run, container) if run else None
            return list(found.signals) if found else []

    def command(self, pod: str, namespace: str | None = None, container: str | None = None) -> list[str]:
        """The argv the pod's container was (last) started with, `$(VAR)`s expanded."""
        with self._lock:
            run = self._find(pod, namespace)
            found = self._container(run, container) if run else None
            return list(found.argv) if found else []

    def log(self, pod: str, namespace: str | None = None, container: str | None = None) -> str:
        """What the pod's container printed (every run of it, and nothing else), also after the pod is gone."""
        with self._lock:
            run = self._find(pod, namespace)
            found = self._container(run, container) if run else None
            path = found.log_path if found else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def running(self) -> dict[str, int]:
        """`namespace/pod` -> pid of the first container, for every pod with a live process."""
        with self._lock:
            return {
                f"{run.namespace}/{run.name}": run.containers[0].process.pid
                for run in self._runs.values()
                if run.containers and run.containers[0].running and run.containers[0].process
            }

    def _find(self, pod: str, namespace: str | None) -> _PodRun | None:
        namespace = namespace or self.namespace
        matches = [run for run in self._runs.values() if run.name == pod and namespace in (None, run.namespace)]
        live = [run for run in matches if not run.finished]
        return (live or matches or [None])[-1]

    @staticmethod
    def _container(run: _PodRun, name: str | None) -> _Container | None:
        for container in run.containers:
            if name is None or container.name == name:
                return container
        return None

    # -- the Node

    def _register_node(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "cwo.test/process-kubelet": "1",
        }
        body = {"metadata": {"name": self.node_name, "labels": labels}, "spec": {}}
        try:
            self.core.create_node(body, _preload_content=False)
        except ApiException as error:
            if error.status != 409:
                raise
        resources = {"cpu": str(os.cpu_count() or 1), "memory": "16Gi", "pods": "110"}
        now = _now()
        status = {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": NODE_IP}, {"type": "Hostname", "address": self.node_name}],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "process kubelet is ready",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                },
            ],
            "nodeInfo": {
                "kubeletVersion": "v0.0.0-process",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "process://1",
                "kernelVersion": os.uname().release,
                "osImage": "process kubelet",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kubeProxyVersion": "",
            },
        }
        self.core.patch_node_status(
            self.node_name, {"status": status}, _content_type="application/merge-patch+json", _preload_content=False
        )

    # -- watching pods (thread 1): list, then watch from the list's version; relist on any error

    def _list_kwargs(self) -> dict[str, Any]:
        return {"label_selector": self.label_selector} if self.label_selector else {}

    def _list_call(self, **kwargs: Any) -> Any:
        kwargs.update(self._list_kwargs(), _preload_content=False)
        if self.namespace:
            return self.core.list_namespaced_pod(self.namespace, **kwargs)
        return self.core.list_pod_for_all_namespaces(**kwargs)

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                listing = json.loads(self._list_call().data)
                seen = set()
                for pod in listing.get("items", []):
                    seen.add(pod["metadata"]["uid"])
                    self._events.put(("SYNC", pod))
                with self._lock:
                    vanished = [run.pod for uid, run in self._runs.items() if uid not in seen and not run.finished]
                for pod in vanished:
                    self._events.put(("DELETED", pod))
                version = listing["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    version = self._watch_once(version)
            except Exception as error:  # relist after a lost watch (410 Gone, connection reset, ...)
                if self._stop.is_set():
                    return
                expired = isinstance(error, _Gone) or (isinstance(error, ApiException) and error.status == 410)
                if not expired and not _transient(error):
                    self.errors.append(f"watch: {error!r}")
                self._stop.wait(0.5)

    def _watch_once(self, version: str) -> str:
        response = self._list_call(
            watch=True, resource_version=version, allow_watch_bookmarks=True, timeout_seconds=300
        )
        self._watch_response = response
        try:
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    break
                event = json.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    raise _Gone(obj.get("message", "watch error"))
                version = obj.get("metadata", {}).get("resourceVersion", version)
                if kind != "BOOKMARK":
                    self._events.put(("DELETED" if kind == "DELETED" else "SYNC", obj))
        finally:
            self._watch_response = None
            with contextlib.suppress(Exception):
                response.release_conn()
        return version

    # -- acting (thread 2): pod events, then process exits, grace periods and restarts

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                kind, pod = self._events.get(timeout=0.1)
            except queue.Empty:
                kind, pod = "", {}
            with self._lock:
                now = time.monotonic()
                due = [(k, p) for at, k, p in self._retries if at <= now]
                self._retries = [entry for entry in self._retries if entry[0] > now]
                for k, p in ([(kind, pod)] if kind else []) + due:
                    self._handle(k, p)
                try:
                    self._tick()
                except Exception as error:
                    self.errors.append(f"tick: {error!r}")
                    self._stop.wait(0.2)

    def _handle(self, kind: str, pod: Pod) -> None:
        """One pod event; a call the API server could not answer (restarting, 5xx) is retried."""
        try:
            if kind == "DELETED":
                self._deleted(pod)
            elif kind == "SYNC":
                self._sync(pod)
            elif kind == "FINALIZE":
                self._delete_now(pod)
        except Exception as error:
            if not _transient(error):
                self.errors.append(f"{kind.lower()} {pod['metadata']['name']}: {error!r}")
            self._retries.append((time.monotonic() + 0.5, kind, pod))

    def _sync(self, pod: Pod) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        run = self._runs.get(meta["uid"])
        node = spec.get("nodeName")
        if not node:
            if not meta.get("deletionTimestamp") and not spec.get("schedulingGates"):
                self._bind(pod)
            return
        if node != self.node_name:
            return
        if meta.get("deletionTimestamp"):
            if run is None:
                self._finalize_unknown(pod)
            elif not run.finished:
                run.pod = pod
                if run.terminate_deadline is None:
                    self._begin_termination(run)
            return
        if run is None:
            self._start_pod(pod)
        elif run.terminate_deadline is None:  # (a retried, older event may come after a newer one)
            run.pod = pod

    def _deleted(self, pod: Pod) -> None:
        """The pod is gone from the API (finalized, or force-deleted): nothing of it may keep running."""
        run = self._runs.get(pod["metadata"]["uid"])
        if run is None or run.finished:
            return
        for container in run.containers:
            if container.process is not None:
                self._reap(run, container, force=True)
        run.finished = True

    def _bind(self, pod: Pod) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            self.core.create_namespaced_pod_binding(meta["name"], meta["namespace"], body, _preload_content=False)
        except ApiException as error:
            if error.status not in (404, 409):  # gone, or already bound (the watch brings the new state)
                raise

    # -- starting

    def _start_pod(self, pod: Pod) -> None:
        meta = pod["metadata"]
        folder = Path(self._logs.name, meta["namespace"], f"{meta['name']}-{meta['uid'][:8]}")
        folder.mkdir(parents=True, exist_ok=True)
        containers = [_Container(spec, folder / f"{spec['name']}.log") for spec in pod["spec"]["containers"]]
        run = _PodRun(pod, containers, _now())
        self._runs[meta["uid"]] = run
        for container in containers:
            self._start_container(run, container)
        self._report(run)

    def _start_container(self, run: _PodRun, container: _Container) -> None:
        container.restart_at, container.error = None, None
        if self._stop.is_set():  # closing: start nothing that close() might miss
            return
        try:
            argv, env = self._command(run.pod, container.spec)
            mounts = self._projected_mounts(run.pod, container.spec, container.log_path.parent)
        except Exception as error:  # ConfigError, or reading a Secret failed: retried, as the kubelet does
            container.error = str(error) if isinstance(error, ConfigError) else repr(error)
            container.restart_at = time.monotonic() + self.restart_backoff  # retry, as the kubelet does
            return
        cwd = container.spec.get("workingDir") or self.cwd
        container.argv = argv
        with container.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            try:
                container.process = subprocess.Popen(
                    self._mounted(argv, mounts),
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    # Killed with the work thread that starts them: a killed test run leaves no pod behind.
                    preexec_fn=die_with_parent(signal.SIGKILL),
                )
            except OSError as error:
                container.process = None
                self._exited(run, container, 128, "StartError", str(error))
                return
        container.started_at = _now()
        container.ready = self.ready_when is None

    def _command(self, pod: Pod, spec: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        own = self._container_env(pod, spec)
        argv = self.command_for(pod, spec) if self.command_for else None
        if argv is None:
            if not spec.get("command"):
                raise ConfigError(
                    f"container {spec['name']!r} has no command: the process kubelet cannot run an image's entrypoint"
                )
            argv = [expand(part, own) for part in [*spec["command"], *spec.get("args", [])]]
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        env.update(self.extra_env)
        env["HOSTNAME"] = pod["metadata"]["name"]
        if self.api_server is not None:
            env["KUBERNETES_SERVICE_HOST"] = self.api_server.hostname or NODE_IP
            env["KUBERNETES_SERVICE_PORT"] = str(self.api_server.port or 443)
        env.update(own)
        return argv, env

    # -- projected volumes (with api_server): files, bind-mounted in a private mount namespace

    def _projected_mounts(self, pod: Pod, spec: dict[str, Any], folder: Path) -> list[tuple[Path, str]]:
        """(folder holding the volume's files, mountPath) for each projected volume the container mounts
        (none without `api_server`)."""
        if self.api_server is None:
            return []
        volumes = {volume["name"]: volume for volume in pod["spec"].get("volumes", [])}
        mounts = []
        for mount in spec.get("volumeMounts", []):
            projected = volumes.get(mount["name"], {}).get("projected")
            if projected is None:
                continue
            if not mount["mountPath"].startswith(("/var/run/", "/run/")):
                raise ConfigError(f"the process kubelet mounts projected volumes under /var/run only: {mount}")
            source = folder / "volumes" / mount["name"]
            source.mkdir(parents=True, exist_ok=True)
            for item in projected.get("sources", []):
                for path, text in self._projection(pod, item):
                    (source / path).write_text(text)
            mounts.append((source, mount["mountPath"]))
        return mounts

    def _projection(self, pod: Pod, item: dict[str, Any]) -> list[tuple[str, str]]:
        """(file name, content) of one source of a projected volume."""
        meta = pod["metadata"]
        if token := item.get("serviceAccountToken"):
            request: dict[str, Any] = {
                "expirationSeconds": token.get("expirationSeconds", 3607),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
            }
            if token.get("audience"):
                request["audiences"] = [token["audience"]]
            account = pod["spec"].get("serviceAccountName", "default")
            response = self.core.create_namespaced_service_account_token(
                account, meta["namespace"], {"spec": request}, _preload_content=False
            )
            return [(token["path"], json.loads(response.data)["status"]["token"])]
        if ref := item.get("configMap"):
            data = self._config_map(meta["namespace"], ref["name"], ref.get("optional", False))
            missing = [entry["key"] for entry in ref.get("items", []) if entry["key"] not in data]
            if missing:
                raise ConfigError(f"configmap {ref['name']!r} has no key {missing[0]!r} (yet)")
            return [(entry["path"], data[entry["key"]]) for entry in ref.get("items", [])]
        if ref := item.get("downwardAPI"):
            return [(entry["path"], self._field(pod, entry["fieldRef"]["fieldPath"])) for entry in ref["items"]]
        raise ConfigError(f"unsupported projected volume source {item!r}")

    @staticmethod
    def _mounted(argv: list[str], mounts: list[tuple[Path, str]]) -> list[str]:
        """`argv` in a private mount namespace with a fresh /run and each folder bind-mounted read-only."""
        if not mounts:
            return argv
        script = (
            "set -e; mount -t tmpfs -o mode=755 cwo-run /run; "
            'while [ "$1" != -- ]; do mkdir -p "$2"; mount --bind "$1" "$2"; mount -o remount,bind,ro "$2"; '
            'shift 2; done; shift; exec "$@"'
        )
        pairs = [str(part) for source, target in mounts for part in (source, target)]
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *pairs, "--", *argv]

    def _container_env(self, pod: Pod, spec: dict[str, Any]) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in spec.get("envFrom", []):
            prefix = source.get("prefix", "")
            if ref := source.get("configMapRef"):
                data = self._config_map(namespace, ref["name"], ref.get("optional", False))
            elif ref := source.get("secretRef"):
                data = self._secret(namespace, ref["name"], ref.get("optional", False))
            else:
                continue
            env.update({prefix + key: value for key, value in data.items()})
        for var in spec.get("env", []):
            source = var.get("valueFrom")
            if source is None:
                env[var["name"]] = expand(var.get("value", ""), env)
                continue
            value = self._value_from(pod, spec, source)
            if value is not None:
                env[var["name"]] = value
        return env

    def _value_from(self, pod: Pod, spec: dict[str, Any], source: dict[str, Any]) -> str | None:
        namespace = pod["metadata"]["namespace"]
        if ref := source.get("fieldRef"):
            return self._field(pod, ref["fieldPath"])
        for kind, read in (("secretKeyRef", self._secret), ("configMapKeyRef", self._config_map)):
            if ref := source.get(kind):
                optional = ref.get("optional", False)
                data = read(namespace, ref["name"], optional)
                if ref["key"] not in data:
                    if optional:
                        return None
                    raise ConfigError(f"couldn't find key {ref['key']} in {kind[:-6]} {namespace}/{ref['name']}")
                return data[ref["key"]]
        if ref := source.get("resourceFieldRef"):
            return self._resource(pod, spec, ref)
        raise ConfigError(f"unsupported valueFrom {source!r}")

    @staticmethod
    def _field(pod: Pod, path: str) -> str:
        meta = pod["metadata"]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return str(meta.get(match.group(1), {}).get(match.group(2), ""))
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "metadata.labels": "\n".join(f'{k}="{v}"' for k, v in sorted(meta.get("labels", {}).items())),
            "metadata.annotations": "\n".join(f'{k}="{v}"' for k, v in sorted(meta.get("annotations", {}).items())),
            "spec.nodeName": pod["spec"].get("nodeName", ""),
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
            "status.hostIP": NODE_IP,
            "status.hostIPs": NODE_IP,
            "status.podIP": NODE_IP,
            "status.podIPs": NODE_IP,
        }
        if path not in simple:
            raise ConfigError(f"unsupported fieldRef {path!r}")
        return str(simple[path])

    @staticmethod
    def _resource(pod: Pod, spec: dict[str, Any], ref: dict[str, Any]) -> str:
        if ref.get("containerName"):
            spec = next(c for c in pod["spec"]["containers"] if c["name"] == ref["containerName"])
        kind, _, resource = ref["resource"].partition(".")
        resources = spec.get("resources", {})
        value = resources.get(kind, {}).get(resource)
        if value is None and kind == "requests":
            value = resources.get("limits", {}).get(resource)
        if value is None:  # no limit: the node's allocatable, as the kubelet does
            value = {"cpu": os.cpu_count() or 1, "memory": "16Gi", "ephemeral-storage": "100Gi"}.get(resource, 0)
        divisor = quantity(ref.get("divisor", "1")) or 1.0
        return str(math.ceil(quantity(value) / divisor))

    def _secret(self, namespace: str, name: str, optional: bool) -> dict[str, str]:
        data = self._read(self.core.read_namespaced_secret, namespace, name, optional, "secret")
        return {key: base64.b64decode(value).decode() for key, value in (data.get("data") or {}).items()}

    def _config_map(self, namespace: str, name: str, optional: bool) -> dict[str, str]:
        data = self._read(self.core.read_namespaced_config_map, namespace, name, optional, "configmap")
        return dict(data.get("data") or {})

    @staticmethod
    def _read(read: Callable[..., Any], namespace: str, name: str, optional: bool, what: str) -> dict[str, Any]:
        try:
            return dict(json.loads(read(name, namespace, _preload_content=False).data))
        except ApiException as error:
            if error.status == 404:
                if optional:
                    return {}
                raise ConfigError(f'{what} "{name}" not found') from None
            raise

    # -- exits, restarts, terminations

    def _tick(self) -> None:
        now = time.monotonic()
        for run in list(self._runs.values()):
            if run.finished:
                continue
            if run.terminate_deadline is not None:
                live = [c for c in run.containers if c.running]
                if not live or now >= run.terminate_deadline:
                    for container in run.containers:
                        if container.process is not None:
                            self._reap(run, container, force=container.running)
                    self._finalize(run)
                continue
            changed = False
            for container in run.containers:
                process = container.process
                if process is not None and process.poll() is not None:
                    self._reap(run, container, force=False)
                    self._exited(run, container, process.returncode, None, None)
                    changed = True
                elif process is not None and not container.ready and self._probe(run, container):
                    container.ready = changed = True
                elif process is None and container.restart_at is not None and now >= container.restart_at:
                    if container.error is None:
                        container.restart_count += 1
                    self._start_container(run, container)
                    changed = True
            if changed or run.unreported:
                self._report(run)

    def _probe(self, run: _PodRun, container: _Container) -> bool:
        if self.ready_when is None:
            return True
        try:
            output = container.log_path.read_text(errors="replace")
        except OSError:
            return False
        return bool(self.ready_when(run.pod, container.name, output))

    def _exited(self, run: _PodRun, container: _Container, code: int, reason: str | None, message: str | None) -> None:
        """Record the exit and decide about a restart (restartPolicy), with a doubling back-off."""
        container.last_terminated = {
            "exitCode": code if code >= 0 else 128 - code,  # killed by signal N: 128 + N, as a container runtime says
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": container.started_at or _now(),
            "finishedAt": _now(),
            "containerID": f"process://{container.process.pid if container.process else 0}",
        }
        if message:
            container.last_terminated["message"] = message
        container.process, container.ready = None, False
        policy = run.pod["spec"].get("restartPolicy", "Always")
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            delay = min(self.restart_backoff * 2 ** min(container.restart_count, 10), self.max_restart_backoff)
            container.restart_at = time.monotonic() + delay
        else:
            container.done = True

    def _reap(self, run: _PodRun, container: _Container, *, force: bool) -> None:
        """SIGKILL what is left of the container's process group (children too), wait, record the exit."""
        process = container.process
        if process is None:
            return
        if force:
            container.signals.append("SIGKILL")
        _kill_group(process, signal.SIGKILL)  # also any descendant left after the leader exited
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        self.exits.append(
            Exit(
                run.namespace,
                run.name,
                run.uid,
                container.name,
                process.pid,
                process.returncode if process.returncode is not None else -9,
                list(container.signals),
                container.log_path,
            )
        )
        if force or run.terminate_deadline is not None:
            code = process.returncode if process.returncode is not None else -9
            container.last_terminated = {
                "exitCode": code if code >= 0 else 128 - code,
                "reason": "Completed" if code == 0 else "Error",
                "startedAt": container.started_at or _now(),
                "finishedAt": _now(),
                "containerID": f"process://{process.pid}",
            }
            container.process, container.done = None, True

    def _begin_termination(self, run: _PodRun) -> None:
        meta, spec = run.pod["metadata"], run.pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", 30)
        run.terminate_deadline = time.monotonic() + float(grace)
        for container in run.containers:
            container.restart_at = None
            if container.running and container.process is not None:
                container.signals.append("SIGTERM")
                with contextlib.suppress(ProcessLookupError):
                    container.process.send_signal(signal.SIGTERM)

    def _finalize(self, run: _PodRun) -> None:
        """Report the containers terminated, then remove the pod (grace 0, this uid only)."""
        run.finished = True
        for container in run.containers:
            container.done, container.restart_at = True, None
        self._report(run)
        try:
            self._delete_now(run.pod)
        except Exception as error:
            if not _transient(error):
                self.errors.append(f"finalize {run.name}: {error!r}")
            self._retries.append((time.monotonic() + 0.5, "FINALIZE", run.pod))

    def _finalize_unknown(self, pod: Pod) -> None:
        self._delete_now(pod)

    def _delete_now(self, pod: Pod) -> None:
        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                grace_period_seconds=0,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
                _preload_content=False,
            )
        except ApiException as error:
            if error.status not in (404, 409):  # gone already, or a new pod of the same name
                raise

    # -- status

    def _report(self, run: _PodRun) -> None:
        statuses, all_ready, any_alive = [], True, False
        for container in run.containers:
            running = container.running
            all_ready = all_ready and running and container.ready
            pending = container.restart_at is not None or container.error is not None
            any_alive = any_alive or running or pending
            status: dict[str, Any] = {
                "name": container.name,
                "image": container.spec.get("image", ""),
                "imageID": "",
                "restartCount": container.restart_count,
                "ready": running and container.ready,
                "started": running,
            }
            if running and container.process is not None:
                status["state"] = {"running": {"startedAt": container.started_at}}
                status["containerID"] = f"process://{container.process.pid}"
            elif container.error is not None:
                status["state"] = {"waiting": {"reason": "CreateContainerConfigError", "message": container.error}}
            elif container.restart_at is not None:
                message = f"back-off restarting failed container {container.name}"
                status["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
            elif container.done and container.last_terminated is not None:
                status["state"] = {"terminated": container.last_terminated}
            else:
                status["state"] = {"waiting": {"reason": "ContainerCreating"}}
            if container.last_terminated is not None and "terminated" not in status["state"]:
                status["lastState"] = {"terminated": container.last_terminated}
            statuses.append(status)
        if any_alive and not run.finished:
            phase = "Running" if any(c.started_at for c in run.containers) else "Pending"
        else:
            codes = [c.last_terminated["exitCode"] if c.last_terminated else 1 for c in run.containers]
            phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        ready = "True" if all_ready and not run.finished else "False"
        wanted = {
            "PodReadyToStartContainers": "True" if not run.finished else "False",
            "Initialized": "True",
            "ContainersReady": ready,
            "Ready": ready,
            "PodScheduled": "True",
        }
        now = _now()
        conditions = []
        for kind, value in wanted.items():
            previous = run.conditions.get(kind)
            since = previous[1] if previous and previous[0] == value else now
            run.conditions[kind] = (value, since)
            conditions.append({"type": kind, "status": value, "lastProbeTime": None, "lastTransitionTime": since})
        body = {
            "status": {
                "phase": phase,
                "conditions": conditions,
                "hostIP": NODE_IP,
                "hostIPs": [{"ip": NODE_IP}],
                "podIP": NODE_IP,
                "podIPs": [{"ip": NODE_IP}],
                "startTime": run.started,
                "containerStatuses": statuses,
            }
        }
        run.unreported = False
        try:
            self.core.patch_namespaced_pod_status(
                run.name, run.namespace, body, _content_type="application/merge-patch+json", _preload_content=False
            )
        except Exception as error:
            if isinstance(error, ApiException) and error.status == 404:  # gone meanwhile
                return
            if not _transient(error):
                self.errors.append(f"status {run.name}: {error!r}")
            else:
                run.unreported = True


def _transient(error: Exception) -> bool:
    """A failure worth retrying: the API server restarting, unreachable, overloaded or failing."""
    if isinstance(error, ApiException):
        return error.status is None or error.status == 429 or error.status >= 500
    return isinstance(error, urllib3.exceptions.HTTPError | OSError)


class _Gone(Exception):
    """The watch ended with an ERROR event (410 Gone and the like): relist."""
