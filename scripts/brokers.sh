#!/usr/bin/env bash
# Installs (when asked) and starts the brokers the tests talk to, on loopback only:
# Redis on 127.0.0.1:6379, RabbitMQ on 127.0.0.1:5672 with the management API on 15672, and a Redis
# Sentinel on 127.0.0.1:26390 watching master `cwo-master` (a second Redis, 127.0.0.1:6390); ports
# apart from Debian's own sentinel service (26379), which watches the shared Redis. A TLS-only Redis on
# 127.0.0.1:6391 that wants a client certificate, with a private CA, server and client certificates
# made by openssl in $state_dir/tls (ca.crt, client.crt, client.key for the tests).
# A server that already answers is reused, never restarted.
#   scripts/brokers.sh install [redis]   apt-get the Debian packages that are missing (needs root)
#   scripts/brokers.sh start [redis]     start whatever does not answer yet, then wait for it
# With `redis`, only Redis (what `make demo` needs).
set -euo pipefail

state_dir=${CWO_BROKER_STATE:-/tmp/cwo-brokers}

answers() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

only_redis=""
[ "${2:-}" = redis ] && only_redis=yes

install_missing() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  if [ -z "$only_redis" ]; then
    command -v redis-sentinel >/dev/null || missing+=(redis-sentinel)
    command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
    command -v openssl >/dev/null || missing+=(openssl)  # the TLS Redis's private CA and certificates
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "brokers: ${missing[*]} missing; install them (as root: bash scripts/brokers.sh install)" >&2
    return 1
  fi
  echo "brokers: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_redis() {
  if answers 127.0.0.1 6379; then echo "brokers: reusing Redis on 127.0.0.1:6379"; return; fi
  mkdir -p "$state_dir/redis"
  redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' --appendonly no \
    --dir "$state_dir/redis" --logfile "$state_dir/redis.log"
}

start_sentinel() {
  if ! command -v redis-sentinel >/dev/null; then
    echo "brokers: redis-sentinel missing (bash scripts/brokers.sh install); its tests will skip, or fail under CI" >&2
    return 1
  fi
  if ! answers 127.0.0.1 6390; then
    mkdir -p "$state_dir/sentinel-master"
    redis-server --bind 127.0.0.1 --port 6390 --daemonize yes --save '' --appendonly no \
      --dir "$state_dir/sentinel-master" --logfile "$state_dir/sentinel-master.log"
  fi
  if answers 127.0.0.1 26390; then echo "brokers: reusing Redis Sentinel on 127.0.0.1:26390"; return; fi
  # Sentinel rewrites its config file as it learns the group, so it gets a fresh one each start.
  cat > "$state_dir/sentinel.conf" <<CONF
bind 127.0.0.1
port 26390
daemonize yes
logfile $state_dir/sentinel.log
dir $state_dir
sentinel monitor cwo-master 127.0.0.1 6390 1
CONF
  redis-sentinel "$state_dir/sentinel.conf"
}

make_tls_certificates() { # dir: a private CA, a server certificate for 127.0.0.1 and a client certificate
  local dir=$1 ossl_log=$1/openssl.log
  [ -s "$dir/client.key" ] && return 0
  (umask 077 && mkdir -p "$dir")
  openssl req -x509 -nodes -newkey rsa:2048 -sha256 -days 3650 -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -subj /CN=cwo-test-broker-ca -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign 2>>"$ossl_log"
  local name usage
  for name in server client; do
    usage=serverAuth
    [ "$name" = client ] && usage=clientAuth
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=%s\n' "$usage" > "$dir/$name.ext"
    openssl req -new -nodes -newkey rsa:2048 -keyout "$dir/$name.key" -out "$dir/$name.csr" \
      -subj "/CN=cwo-test-$name" 2>>"$ossl_log"
    openssl x509 -req -sha256 -days 3650 -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
      -CAcreateserial -out "$dir/$name.crt" -extfile "$dir/$name.ext" 2>>"$ossl_log"
  done
}

start_tls_redis() {
  if answers 127.0.0.1 6391; then echo "brokers: reusing TLS Redis on 127.0.0.1:6391"; return; fi
  if ! command -v openssl >/dev/null; then
    echo "brokers: openssl missing (bash scripts/brokers.sh install); the TLS Redis tests will skip, or fail under CI" >&2
    return 1
  fi
  if ! make_tls_certificates "$state_dir/tls"; then
    echo "brokers: openssl could not make the TLS Redis's certificates:" >&2
    tail -n 5 "$state_dir/tls/openssl.log" >&2
    return 1
  fi
  mkdir -p "$state_dir/tls-redis"
  local tls=$state_dir/tls
  redis-server --bind 127.0.0.1 --port 0 --tls-port 6391 --daemonize yes --save '' --appendonly no \
    --tls-cert-file "$tls/server.crt" --tls-key-file "$tls/server.key" --tls-ca-cert-file "$tls/ca.crt" \
    --tls-auth-clients yes --dir "$state_dir/tls-redis" --logfile "$state_dir/tls-redis.log"
}

start_rabbitmq() {
  if answers 127.0.0.1 5672; then echo "brokers: reusing RabbitMQ on 127.0.0.1:5672"; return; fi
  mkdir -p "$state_dir/rabbitmq/mnesia" "$state_dir/rabbitmq/log"
  cat > "$state_dir/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:5672
management.tcp.ip = 127.0.0.1
management.tcp.port = 15672
loopback_users.guest = true
CONF
  echo '[rabbitmq_management].' > "$state_dir/enabled_plugins"
  export RABBITMQ_CONFIG_FILE="$state_dir/rabbitmq" RABBITMQ_ENABLED_PLUGINS_FILE="$state_dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$state_dir/rabbitmq/mnesia" RABBITMQ_LOG_BASE="$state_dir/rabbitmq/log" \
    RABBITMQ_NODENAME="cwo@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  # Debian's wrapper drops root to the rabbitmq user, which must own the node's directories.
  if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq "$state_dir/rabbitmq"; fi
  (cd "$state_dir/rabbitmq" && exec rabbitmq-server > "$state_dir/rabbitmq.out" 2>&1) &
  rabbitmq_pid=$!
}

rabbitmq_pid=""

wait_for() { # name host port seconds
  local deadline=$((SECONDS + $4))
  until answers "$2" "$3"; do
    local died=""
    [ -n "$rabbitmq_pid" ] && ! kill -0 "$rabbitmq_pid" 2>/dev/null && died=yes
    if [ $SECONDS -ge $deadline ] || [ -n "$died" ]; then
      echo "brokers: $1 did not answer on $2:$3 within $4 s; logs in $state_dir" >&2
      tail -n 30 "$state_dir"/*.log "$state_dir"/*.out 2>/dev/null >&2 || true
      return 1
    fi
    sleep 1
  done
  echo "brokers: $1 answers on $2:$3"
}

case "${1:-start}" in
  install) install_missing ;;
  start)
    start_redis
    wait_for Redis 127.0.0.1 6379 30
    [ -n "$only_redis" ] && exit 0
    start_sentinel && wait_for "Redis Sentinel" 127.0.0.1 26390 30
    start_tls_redis && wait_for "TLS Redis" 127.0.0.1 6391 30
    start_rabbitmq
    wait_for RabbitMQ 127.0.0.1 5672 120
    wait_for "RabbitMQ management" 127.0.0.1 15672 60
    ;;
  *) echo "usage: $0 install|start" >&2; exit 2 ;;
esac
