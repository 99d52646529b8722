#!/usr/bin/env bash
# A local 2-shard ClickHouse cluster from Debian's clickhouse-server, for trying fleet mode on one box
# (and for the fleet tests): two server processes on 127.0.0.1, data in a temporary folder, stopped by PID.
#
#   scripts/clickhouse_cluster.sh start [DIR] [BASE_PORT] [--tls CERT KEY]
#                                                           # prints DIR; shards on BASE_PORT and BASE_PORT+1
#   scripts/clickhouse_cluster.sh stop DIR                  # stop each server by its PID, then remove DIR
#                                                           # (SIGKILL under /tmp, whose data goes; else SIGTERM)
#   scripts/clickhouse_cluster.sh stop-shard DIR N          # stop shard N (1 or 2) only (outage tests)
#   scripts/clickhouse_cluster.sh start-shard DIR N         # start shard N again on the same data
#
# Native ports: BASE_PORT (shard 1), BASE_PORT+1 (shard 2); HTTP BASE_PORT+100/+101; interserver +200/+201.
# With --tls CERT KEY (PEM files: the server certificate, signed by the CA clients trust, and its key) each
# shard also listens for TLS on the native protocol (tcp_port_secure) at BASE_PORT+300 / BASE_PORT+301;
# clients use clickhouse-driver's secure=True with ca_certs (NTM_CLICKHOUSE_SECURE, NTM_CLICKHOUSE_CA_CERTS).
# The shards still talk to each other in plain text on 127.0.0.1 (Distributed queries between them).
# The cluster is named "fleet" in each server's remote_servers (no ZooKeeper: no distributed DDL, the
# project creates the local tables on every shard itself). User "default" without a password, 127.0.0.1 only
# (the shards use it between themselves), and user "fleet" with the password "fleet-test-password" (for
# trying, and testing, credentials from CLICKHOUSE_USER and CLICKHOUSE_PASSWORD_FILE; never for production),
# and user "reader" (password "reader-test-password", profile readonly: a page or `history` account).
# Cluster "dc-2a" is "fleet" under a name SQL reads only quoted; cluster "replicas" has one shard whose two
# replicas are the two servers (each replica gets its own local tables).
set -euo pipefail

SERVER=${CLICKHOUSE_SERVER:-/usr/sbin/clickhouse-server}
cmd=${1:-}

die() { echo "clickhouse_cluster: $*" >&2; exit 1; }

write_config() {  # DIR N BASE_PORT [CERT KEY]
  local dir=$1 n=$2 base=$3 cert=${4:-} key=${5:-}
  local sd="$dir/shard$n" tcp=$((base + n - 1)) tls=""
  mkdir -p "$sd/data" "$sd/tmp" "$sd/user_files" "$sd/format_schemas" "$sd/log"
  if [ -n "$cert" ]; then
    tls="<tcp_port_secure>$((tcp + 300))</tcp_port_secure>
  <openSSL><server><certificateFile>$cert</certificateFile><privateKeyFile>$key</privateKeyFile>
    <verificationMode>none</verificationMode><loadDefaultCAFile>false</loadDefaultCAFile>
    <cacheSessions>true</cacheSessions><disableProtocols>sslv2,sslv3,tlsv1,tlsv1_1</disableProtocols>
    <preferServerCiphers>true</preferServerCiphers></server></openSSL>"
  fi
  cat >"$sd/config.xml" <<EOF
<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>$sd/log/server.log</log><errorlog>$sd/log/error.log</errorlog>
    <size>10M</size><count>2</count></logger>
  <listen_host>127.0.0.1</listen_host>
  <tcp_port>$tcp</tcp_port>
  $tls
  <http_port>$((tcp + 100))</http_port>
  <interserver_http_port>$((tcp + 200))</interserver_http_port>
  <interserver_http_host>127.0.0.1</interserver_http_host>
  <path>$sd/data/</path>
  <tmp_path>$sd/tmp/</tmp_path>
  <user_files_path>$sd/user_files/</user_files_path>
  <format_schema_path>$sd/format_schemas/</format_schema_path>
  <users_config>$dir/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
  <remote_servers>
    <fleet>
      <shard><replica><host>127.0.0.1</host><port>$base</port></replica></shard>
      <shard><replica><host>127.0.0.1</host><port>$((base + 1))</port></replica></shard>
    </fleet>
    <dc-2a>
      <shard><replica><host>127.0.0.1</host><port>$base</port></replica></shard>
      <shard><replica><host>127.0.0.1</host><port>$((base + 1))</port></replica></shard>
    </dc-2a>
    <replicas>
      <shard><replica><host>127.0.0.1</host><port>$base</port></replica>
        <replica><host>127.0.0.1</host><port>$((base + 1))</port></replica></shard>
    </replicas>
  </remote_servers>
</yandex>
EOF
}

write_users() {  # DIR
  cat >"$1/users.xml" <<EOF
<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>2000000000</max_memory_usage></default>
    <readonly><readonly>1</readonly></readonly></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
    <profile>default</profile><quota>default</quota></default>
    <fleet><password>fleet-test-password</password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
    <profile>default</profile><quota>default</quota></fleet>
    <reader><password>reader-test-password</password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
    <profile>readonly</profile><quota>default</quota></reader></users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
EOF
}

start_shard() {  # DIR N
  local dir=$1 n=$2 sd="$1/shard$2"
  [ -f "$sd/config.xml" ] || die "no shard $n in $dir"
  if [ -f "$sd/pid" ] && running "$(cat "$sd/pid")" "$sd"; then return 0; fi
  "$SERVER" --config-file="$sd/config.xml" >"$sd/log/stdout.log" 2>&1 &
  echo $! >"$sd/pid"
}

wait_ready() {  # DIR N : until the native port answers a query (at most 30 s)
  local dir=$1 n=$2 sd="$1/shard$2" port
  port=$(sed -n 's:.*<tcp_port>\([0-9]*\)</tcp_port>.*:\1:p' "$sd/config.xml")
  for _ in $(seq 300); do
    if clickhouse-client --host 127.0.0.1 --port "$port" -q "SELECT 1" >/dev/null 2>&1; then return 0; fi
    running "$(cat "$sd/pid")" || { tail -20 "$sd/log/stdout.log" "$sd/log/error.log" >&2 || true;
                                                die "shard $n exited at start"; }
    sleep 0.1
  done
  die "shard $n did not answer on port $port within 30 s"
}

running() {  # PID [SD] : PID runs and is no zombie (an exited server whose parent has not reaped it yet is
  local stat  # done); with SD, it is also shard SD's server (a PID reused by another program is not ours)
  if [ -n "${2:-}" ]; then grep -qzF -- "${2##*/}/config.xml" "/proc/$1/cmdline" 2>/dev/null || return 1; fi
  { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

stop_shard() {  # DIR N [GRACE_S] : SIGTERM by PID, SIGKILL after GRACE_S seconds (default 15) of wall time
  local sd="$1/shard$2" grace=${3:-15} pid end
  [ -f "$sd/pid" ] || return 0
  pid=$(cat "$sd/pid")
  if running "$pid" "$sd"; then
    if [ "$grace" = 0 ]; then kill -KILL "$pid" 2>/dev/null || true; else kill -TERM "$pid" 2>/dev/null || true; fi
    # A deadline, not a count of sleeps: on a loaded machine each `sleep` costs more than it asks for.
    end=$((SECONDS + grace))
    while running "$pid" "$sd" && [ "$SECONDS" -lt "$end" ]; do sleep 0.1; done
    if running "$pid" "$sd"; then
      kill -KILL "$pid" 2>/dev/null || true
      end=$((SECONDS + 5))  # gone (its files closed) before the caller removes the folder
      while running "$pid" "$sd" && [ "$SECONDS" -lt "$end" ]; do sleep 0.05; done
    fi
  fi
  rm -f "$sd/pid"
}

case "$cmd" in
  start)
    shift
    args=() cert="" key=""
    while [ $# -gt 0 ]; do
      case "$1" in
        --tls) cert=$(realpath "${2:?--tls CERT KEY}"); key=$(realpath "${3:?--tls CERT KEY}"); shift 3 ;;
        *) args+=("$1"); shift ;;
      esac
    done
    dir=${args[0]:-$(mktemp -d /tmp/ntm-clickhouse.XXXXXX)}
    base=${args[1]:-19000}
    mkdir -p "$dir"
    write_users "$dir"
    for n in 1 2; do write_config "$dir" $n "$base" "$cert" "$key"; done
    for n in 1 2; do start_shard "$dir" $n; done
    for n in 1 2; do wait_ready "$dir" $n; done
    echo "$dir"
    ;;
  stop)
    dir=${2:?usage: $0 stop DIR}
    # Both at once. A folder under /tmp is removed next: its data is thrown away, so the servers are killed
    # without the orderly shutdown (~2-5 s each here; every fleet test module stops a cluster). Elsewhere data
    # is kept: 15 s of grace.
    grace=15
    case "$dir" in /tmp/*) grace=0 ;; esac
    for n in 1 2; do stop_shard "$dir" $n $grace & done
    wait
    case "$dir" in /tmp/*) rm -rf "$dir" ;; *) echo "clickhouse_cluster: left $dir in place (not under /tmp)" >&2 ;; esac
    ;;
  stop-shard) stop_shard "${2:?DIR}" "${3:?N}" ;;
  start-shard) start_shard "${2:?DIR}" "${3:?N}"; wait_ready "$2" "$3" ;;
  *) die "usage: $0 start [DIR] [BASE_PORT] [--tls CERT KEY] | stop DIR | stop-shard DIR N | start-shard DIR N" ;;
esac
