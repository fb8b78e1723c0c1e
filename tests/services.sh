#!/usr/bin/env bash
# Brings up what the system tests talk to and prints `export` lines for them:
#   - RabbitMQ on 127.0.0.1:5672 (started by the machine; started here if it is down)
#   - Garage (S3) on a free loopback port with a throwaway config, single node, one bucket
#   - a Python venv with pyarrow and duckdb (manifest-reader test), scikit-learn and scipy
#     (the evaluation metrics' reference)
# Usage: eval "$(tests/services.sh start)" ; tests/services.sh stop <dir>
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cmd="${1:-start}"

ensure_garage() {
  if ! command -v garage >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/garage" ]; then
    # A lean build for tests: only the sqlite metadata engine the config below uses, at
    # opt-level 1 (about 7 minutes cold on 2 cores instead of 20). Benchmarks of S3 throughput
    # (finalize) want the full release build: `cargo install garage --locked --force`.
    echo "installing Garage (sqlite only, opt-level 1; about 7 minutes cold)..." >&2
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=0 \
      cargo install garage --locked --no-default-features --features sqlite,bundled-libs >&2
  fi
}

ensure_venv() {
  local v="$here/target/pyenv"
  if [ ! -x "$v/bin/python" ] || ! "$v/bin/python" -c "import pyarrow, duckdb, sklearn, scipy" 2>/dev/null; then
    echo "creating $v with pyarrow, duckdb and scikit-learn..." >&2
    python3 -m venv "$v" >&2
    "$v/bin/pip" install --quiet --disable-pip-version-check pyarrow duckdb scikit-learn scipy >&2
  fi
}

ensure_rabbit() {
  if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
    echo "RabbitMQ is not listening on 127.0.0.1:5672; starting it..." >&2
    rabbitmq-server -detached >&2 || true
    for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done
  fi
  (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null || { echo "RabbitMQ is not reachable on 127.0.0.1:5672" >&2; exit 1; }
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

case "$cmd" in
  install)
    ensure_garage; ensure_venv ;;
  start)
    ensure_garage; ensure_venv; ensure_rabbit
    PATH="$HOME/.cargo/bin:$PATH"
    dir="$(mktemp -d /tmp/defectforge-garage.XXXXXX)"
    s3p=$(free_port); rpcp=$(free_port); admp=$(free_port)
    mkdir -p "$dir/meta" "$dir/data"
    cat > "$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpcp"
rpc_public_addr = "127.0.0.1:$rpcp"
rpc_secret = "$(openssl rand -hex 32)"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3p"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$admp"
TOML
    chmod 600 "$dir/garage.toml"
    ak="GK$(openssl rand -hex 12)"; sk="$(openssl rand -hex 32)"
    GARAGE_DEFAULT_ACCESS_KEY="$ak" GARAGE_DEFAULT_SECRET_KEY="$sk" GARAGE_DEFAULT_BUCKET=defectforge-test \
      nohup garage -c "$dir/garage.toml" server --single-node --default-bucket > "$dir/server.log" 2>&1 &
    echo $! > "$dir/server.pid"
    for _ in $(seq 1 100); do
      curl -sf "http://127.0.0.1:$admp/health" >/dev/null 2>&1 && break; sleep 0.2
    done
    curl -sf "http://127.0.0.1:$admp/health" >/dev/null || { echo "Garage did not start; log:" >&2; cat "$dir/server.log" >&2; exit 1; }
    # the default bucket is created asynchronously right after start-up
    for _ in $(seq 1 50); do
      garage -c "$dir/garage.toml" bucket info defectforge-test >/dev/null 2>&1 && break; sleep 0.2
    done
    echo "export DEFECTFORGE_TEST_GARAGE_DIR='$dir'"
    echo "export DEFECTFORGE_TEST_S3_ENDPOINT='http://127.0.0.1:$s3p'"
    echo "export DEFECTFORGE_TEST_S3_REGION='garage'"
    echo "export DEFECTFORGE_TEST_S3_BUCKET='defectforge-test'"
    echo "export DEFECTFORGE_TEST_S3_ACCESS_KEY_ID='$ak'"
    echo "export DEFECTFORGE_TEST_S3_SECRET_ACCESS_KEY='$sk'"
    echo "export DEFECTFORGE_TEST_AMQP_URL='amqp://guest:guest@127.0.0.1:5672/%2f'"
    echo "export DEFECTFORGE_TEST_PYTHON='$here/target/pyenv/bin/python'"
    ;;
  stop)
    dir="${2:?usage: services.sh stop <garage dir>}"
    [ -f "$dir/server.pid" ] && kill "$(cat "$dir/server.pid")" 2>/dev/null || true
    rm -rf "$dir" ;;
  *) echo "usage: $0 install|start|stop <dir>" >&2; exit 2 ;;
esac
