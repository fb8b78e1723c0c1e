#!/usr/bin/env bash
# The test command: starts Garage (S3) and checks RabbitMQ, builds the binaries, runs every test
# of the workspace against the real services, and stops Garage again.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(tests/services.sh start)"
trap 'tests/services.sh stop "$DEFECTFORGE_TEST_GARAGE_DIR"' EXIT
if [ -z "${DEFECTFORGE_FIXTURES:-}" ] && [ -d ../shared/fixtures ]; then
  export DEFECTFORGE_FIXTURES="$(cd ../shared/fixtures && pwd)"
fi
cargo build --workspace --bins
cargo test --workspace -- "$@"
