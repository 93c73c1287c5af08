#!/usr/bin/env bash
# A real Kubernetes control plane for the tests, on loopback only: etcd, kube-apiserver (RBAC,
# client-certificate auth, service-account tokens) and kube-controller-manager (deployment,
# replicaset, garbage-collector, serviceaccount, token, namespace... controllers). No scheduler
# and no kubelet: tests run tests/support/kubelet.py, which binds pods and runs them as processes.
#   scripts/cluster.sh build            build .cluster/bin/cwo-cluster from tools/cluster (Go modules,
#                                        k8s.io/kubernetes v1.37.2; ~10 min cold on 2 cores, seconds warm)
#   scripts/cluster.sh ensure           build only when the binaries are missing or stale
#   scripts/cluster.sh start            build if needed, start what is not running, wait for /readyz,
#                                        write the admin kubeconfig; a running control plane is reused
#   scripts/cluster.sh restart-apiserver  stop kube-apiserver and start it again (same port, same etcd data),
#                                        then the controller manager; restart-controller-manager: only that
#   scripts/cluster.sh stop             stop the control plane this state folder started
#   scripts/cluster.sh env              print `export KUBECONFIG=...` (eval "$(scripts/cluster.sh env)")
#   scripts/cluster.sh status           exit 0 when the API server answers /readyz
#   scripts/cluster.sh kubectl ARGS...  kubectl with the admin kubeconfig
# Ready binaries: KUBEBUILDER_ASSETS=<envtest-style folder> with etcd, kube-apiserver, kubectl (and
# kube-controller-manager if present) are used instead of building; without a controller manager the
# API server runs as envtest's (ServiceAccount admission off) and nothing reconciles Deployments.
# State (certificates, keys, etcd data, logs, kubeconfig) lives in .cluster/state (CWO_CLUSTER_STATE).
set -eEuo pipefail
trap 'on_error $LINENO "$BASH_COMMAND"' ERR

root=$(cd "$(dirname "$0")/.." && pwd)
bin_dir=${CWO_CLUSTER_BIN:-$root/.cluster/bin}
state_dir=${CWO_CLUSTER_STATE:-$root/.cluster/state}
pki=$state_dir/pki
controllers=${CWO_CLUSTER_CONTROLLERS:-deployment,replicaset,garbagecollector,serviceaccount,serviceaccount-token,namespace,root-ca-cert-publisher,clusterrole-aggregation,podgc}
service_range=10.0.0.0/24
components=(etcd kube-apiserver kube-controller-manager kubectl)

say() { echo "cluster: $*"; }
on_error() { # line command
  echo "cluster: failed at line $1: $2" >&2
  if [ -s "$state_dir/openssl.log" ]; then tail -n 5 "$state_dir/openssl.log" >&2; fi
}
fail() { echo "cluster: $*" >&2; exit 1; }

# -- binaries ---------------------------------------------------------------------------------------

go_build() {
  command -v go >/dev/null || fail "go is not installed; install Go >= 1.26 or set KUBEBUILDER_ASSETS to a folder with etcd, kube-apiserver and kubectl"
  local k8s_version started=$SECONDS
  k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$root/tools/cluster/go.mod")
  local minor=${k8s_version#v1.}; minor=${minor%%.*}
  local ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  say "building $bin_dir/cwo-cluster (etcd, kube-apiserver, kube-controller-manager, kubectl $k8s_version)"
  mkdir -p "$bin_dir"
  (cd "$root/tools/cluster" && GOFLAGS=-buildvcs=false go build -trimpath -ldflags "$ldflags" -o "$bin_dir/cwo-cluster" .)
  for name in "${components[@]}"; do ln -sf cwo-cluster "$bin_dir/$name"; done
  say "built in $((SECONDS - started)) s"
}

built_is_stale() {
  local binary=$bin_dir/cwo-cluster
  [ -x "$binary" ] || return 0
  [ -n "$(find "$root/tools/cluster" -maxdepth 1 \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) -newer "$binary")" ]
}

# Sets etcd_bin, apiserver_bin, kcm_bin (may stay empty) and kubectl_bin: KUBEBUILDER_ASSETS first, then
# .cluster/bin, which is (re)built when it is missing or older than tools/cluster and Go is at hand.
resolve_binaries() {
  local assets=${KUBEBUILDER_ASSETS:-}
  if [ -n "$assets" ] && [ -x "$assets/etcd" ] && [ -x "$assets/kube-apiserver" ] && [ -x "$assets/kubectl" ]; then
    etcd_bin=$assets/etcd apiserver_bin=$assets/kube-apiserver kubectl_bin=$assets/kubectl kcm_bin=""
    if [ -x "$assets/kube-controller-manager" ]; then
      kcm_bin=$assets/kube-controller-manager
    elif [ -x "$bin_dir/kube-controller-manager" ] && ! built_is_stale; then
      kcm_bin=$bin_dir/kube-controller-manager
    fi
    return
  fi
  [ -n "$assets" ] && say "KUBEBUILDER_ASSETS=$assets lacks etcd, kube-apiserver or kubectl; using $bin_dir"
  if built_is_stale; then
    if command -v go >/dev/null; then go_build; elif [ ! -x "$bin_dir/cwo-cluster" ]; then
      fail "no control-plane binaries: install Go >= 1.26 (then \`scripts/cluster.sh build\`) or set KUBEBUILDER_ASSETS to an envtest folder"
    fi
  fi
  etcd_bin=$bin_dir/etcd apiserver_bin=$bin_dir/kube-apiserver kcm_bin=$bin_dir/kube-controller-manager kubectl_bin=$bin_dir/kubectl
}

# -- certificates and keys --------------------------------------------------------------------------

make_pki() {
  mkdir -p "$pki/serving"
  local ossl=(openssl req -x509 -nodes -newkey rsa:2048 -sha256)
  "${ossl[@]}" -days 3650 -keyout "$pki/ca.key" -out "$pki/ca.crt" -subj "/CN=cwo-cluster-ca" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>>"$state_dir/openssl.log"
  sign() { # name subject extensions...
    local name=$1 subject=$2; shift 2
    openssl req -new -nodes -newkey rsa:2048 -keyout "$pki/$name.key" -out "$pki/$name.csr" -subj "$subject" 2>>"$state_dir/openssl.log"
    printf '%s\n' "$@" > "$pki/$name.ext"
    openssl x509 -req -sha256 -days 3650 -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
      -CAcreateserial -out "$pki/$name.crt" -extfile "$pki/$name.ext" 2>>"$state_dir/openssl.log"
    rm -f "$pki/$name.csr" "$pki/$name.ext"
  }
  # The API server's serving pair, laid in its --cert-dir where it looks for apiserver.crt/.key.
  sign serving/apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE" "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  # Client certificates: the admin (group system:masters) and the controller manager's own identity.
  sign admin "/O=system:masters/CN=cwo-admin" "basicConstraints=CA:FALSE" "extendedKeyUsage=clientAuth"
  sign controller-manager "/CN=system:kube-controller-manager" "basicConstraints=CA:FALSE" "extendedKeyUsage=clientAuth"
  # Service-account token signing key.
  openssl genrsa -out "$pki/sa.key" 2048 2>>"$state_dir/openssl.log"
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>>"$state_dir/openssl.log"
  chmod 600 "$pki"/*.key "$pki"/serving/*.key
}

write_kubeconfig() { # file user
  local b64ca b64crt b64key
  b64ca=$(base64 -w0 < "$pki/ca.crt"); b64crt=$(base64 -w0 < "$pki/$2.crt"); b64key=$(base64 -w0 < "$pki/$2.key")
  cat > "$1.tmp" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: cwo
  cluster:
    server: https://127.0.0.1:$apiserver_port
    certificate-authority-data: $b64ca
users:
- name: $2
  user:
    client-certificate-data: $b64crt
    client-key-data: $b64key
contexts:
- name: cwo
  context: {cluster: cwo, user: $2, namespace: default}
current-context: cwo
YAML
  chmod 600 "$1.tmp"
  mv "$1.tmp" "$1"
}

# -- processes --------------------------------------------------------------------------------------

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

launch() { # name binary args... : own session (pid == process group), output to <name>.log
  local name=$1; shift
  printf '%q ' "$@" > "$state_dir/$name.cmd"  # for `restart-apiserver` and the like
  setsid "$@" >> "$state_dir/$name.log" 2>&1 < /dev/null &
  echo $! > "$state_dir/$name.pid"
}

alive() { ours "$1"; }

log_tail() { # name
  echo "---- last lines of $state_dir/$1.log ----" >&2
  tail -n 40 "$state_dir/$1.log" >&2 2>/dev/null || true
  echo "----" >&2
}

admin_curl() { # path [curl options...]
  local path=$1; shift
  curl -sS --max-time 5 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$@" \
    "https://127.0.0.1:$apiserver_port$path"
}

wait_until() { # name seconds command... : poll until the command succeeds; the component must stay up
  local name=$1 deadline=$((SECONDS + $2)); shift 2
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then
      echo "cluster: $name exited during start-up" >&2; log_tail "$name"; stop_all; exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "cluster: $name not ready within $2 s" >&2; log_tail "$name"; stop_all; exit 1
    fi
    sleep 0.2
  done
}

readyz() { [ "$(admin_curl /readyz)" = ok ]; }

load_ports() {
  [ -f "$state_dir/ports" ] || return 1
  # shellcheck disable=SC1091
  source "$state_dir/ports"
}

running() { # the API server of this state folder answers /readyz
  load_ports && alive kube-apiserver && readyz
}

ours() { # name : the pid file names a live process of this state folder (not a reused pid)
  local pid
  pid=$(cat "$state_dir/$1.pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$state_dir"
}

stop_all() { # SIGTERM every component's process group at once, wait up to 10 s, then SIGKILL
  local names=() name
  for name in kube-controller-manager kube-apiserver etcd; do
    if ours "$name"; then names+=("$name"); kill -TERM -- "-$(cat "$state_dir/$name.pid")" 2>/dev/null || true; fi
  done
  for _ in $(seq 1 100); do
    local left=0
    for name in "${names[@]}"; do ours "$name" && left=1; done
    [ $left = 0 ] && break
    sleep 0.1
  done
  for name in "${names[@]}"; do
    ours "$name" && kill -KILL -- "-$(cat "$state_dir/$name.pid")" 2>/dev/null || true
  done
  rm -f "$state_dir"/*.pid
}

relaunch() { # name readiness-command... : stop one component and start it again as it was started
  local name=$1; shift
  load_ports && [ -f "$state_dir/$name.cmd" ] || fail "no $name started from $state_dir"
  local started=$SECONDS pid
  if ours "$name"; then
    pid=$(cat "$state_dir/$name.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do ours "$name" || break; sleep 0.1; done  # kube-apiserver lingers on open watches
    ours "$name" && { kill -KILL -- "-$pid" 2>/dev/null || true; sleep 0.5; }
  fi
  local command
  eval "command=($(cat "$state_dir/$name.cmd"))"
  echo "---- restarted by scripts/cluster.sh ----" >> "$state_dir/$name.log"
  launch "$name" "${command[@]}"
  wait_until "$name" 120 "$@"
  say "$name restarted, ready again after $((SECONDS - started)) s"
}

start() {
  local started=$SECONDS
  if running; then say "reusing the control plane on https://127.0.0.1:$apiserver_port"; return; fi
  resolve_binaries
  command -v openssl >/dev/null || fail "openssl is missing (apt-get install openssl)"
  command -v curl >/dev/null || fail "curl is missing (apt-get install curl)"
  stop_all  # leftovers of a half-dead earlier run of this state folder
  rm -rf "$state_dir"
  mkdir -p "$state_dir"
  local build_seconds=$((SECONDS - started)); started=$SECONDS
  make_pki
  local etcd_port etcd_peer_port kcm_port
  etcd_port=$(free_port) etcd_peer_port=$(free_port) apiserver_port=$(free_port) kcm_port=$(free_port)
  printf 'apiserver_port=%s\netcd_port=%s\nkcm_port=%s\n' "$apiserver_port" "$etcd_port" "$kcm_port" > "$state_dir/ports"

  launch etcd "$etcd_bin" --name cwo --data-dir "$state_dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "cwo=http://127.0.0.1:$etcd_peer_port" --unsafe-no-fsync --log-level warn
  wait_until etcd 30 curl -sSf --max-time 2 "http://127.0.0.1:$etcd_port/health"

  local admission=()
  if [ -z "$kcm_bin" ]; then
    say "no kube-controller-manager: ServiceAccount admission off, nothing reconciles Deployments"
    admission=(--disable-admission-plugins=ServiceAccount)
  fi
  launch kube-apiserver "$apiserver_bin" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$apiserver_port" \
    --cert-dir "$pki/serving" --client-ca-file "$pki/ca.crt" \
    --authorization-mode Node,RBAC --allow-privileged=true \
    --service-cluster-ip-range "$service_range" --endpoint-reconciler-type none \
    --service-account-issuer "https://127.0.0.1:$apiserver_port" \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    "${admission[@]}"
  wait_until kube-apiserver 120 readyz
  write_kubeconfig "$state_dir/kubeconfig" admin
  say "kube-apiserver ready on https://127.0.0.1:$apiserver_port after $((SECONDS - started)) s"

  if [ -n "$kcm_bin" ]; then
    write_kubeconfig "$state_dir/controller-manager.kubeconfig" controller-manager
    launch kube-controller-manager "$kcm_bin" \
      --kubeconfig "$state_dir/controller-manager.kubeconfig" \
      --authentication-kubeconfig "$state_dir/controller-manager.kubeconfig" \
      --authorization-kubeconfig "$state_dir/controller-manager.kubeconfig" \
      --bind-address 127.0.0.1 --secure-port "$kcm_port" --cert-dir "$state_dir/kcm-serving" \
      --controllers "$controllers" --leader-elect=false \
      --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
      --use-service-account-credentials --service-cluster-ip-range "$service_range" \
      --concurrent-deployment-syncs 5 --concurrent-replicaset-syncs 5 --concurrent-gc-syncs 5
    wait_until kube-controller-manager 60 curl -skf --max-time 2 "https://127.0.0.1:$kcm_port/healthz"
    # The serviceaccount controller at work: namespace default gets its ServiceAccount.
    wait_until kube-controller-manager 60 admin_curl /api/v1/namespaces/default/serviceaccounts/default --fail
  fi
  echo "${kcm_bin:+$controllers}" > "$state_dir/controllers"
  say "control plane ready in $((SECONDS - started)) s$([ "$build_seconds" -gt 1 ] && echo " (plus $build_seconds s of build)"): export KUBECONFIG=$state_dir/kubeconfig"
}

case "${1:-}" in
  build) go_build ;;
  ensure)  # build only when the binaries are missing or older than tools/cluster
    resolve_binaries; say "binaries: $apiserver_bin ${kcm_bin:-(no kube-controller-manager)}" ;;
  start) start ;;
  stop)
    if [ -d "$state_dir" ]; then stop_all; say "stopped"; else say "nothing to stop"; fi ;;
  restart-apiserver)
    relaunch kube-apiserver readyz
    # A starting kube-apiserver answers before its RBAC caches are filled: the controller manager's
    # informers get 403s then and sit in back-off for up to a minute. Give it a fresh start too.
    if [ -f "$state_dir/kube-controller-manager.cmd" ]; then
      relaunch kube-controller-manager curl -skf --max-time 2 "https://127.0.0.1:$kcm_port/healthz"
    fi ;;
  restart-controller-manager)
    load_ports || fail "no control plane in $state_dir"
    relaunch kube-controller-manager curl -skf --max-time 2 "https://127.0.0.1:$kcm_port/healthz" ;;
  env) echo "export KUBECONFIG=$state_dir/kubeconfig" ;;
  status)
    if running; then say "ready on https://127.0.0.1:$apiserver_port"; else say "not running"; exit 1; fi ;;
  kubectl)
    shift; resolve_binaries
    exec "$kubectl_bin" --kubeconfig "$state_dir/kubeconfig" "$@" ;;
  *) echo "usage: $0 build|ensure|start|stop|restart-apiserver|restart-controller-manager|env|status|kubectl ARGS..." >&2; exit 2 ;;
esac
