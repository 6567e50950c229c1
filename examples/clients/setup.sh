#!/usr/bin/env bash
# Installs what the client examples need into DIR (default ~/.cache/sluice/clients):
# a Python venv with grpcio and grpcio-tools (from PyPI), the Python stubs generated
# from proto/sluice/v1/queues.proto, and @grpc/grpc-js with @grpc/proto-loader (from
# the npm registry). Idempotent; prints the environment to run the examples with.
#
#   eval "$(examples/clients/setup.sh)"
#   "$SLUICE_PYTHON" examples/clients/python/orders.py --count 100
#   node examples/clients/node/orders.js --count 100
#   cargo run -p sluice-example-orders -- --count 100   (Rust: nothing to install)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${1:-${SLUICE_CACHE_DIR:-$HOME/.cache/sluice}/clients}
mkdir -p "$DIR"
if [[ ! -x "$DIR/venv/bin/python" ]] || ! "$DIR/venv/bin/python" -c 'import grpc, grpc_tools' 2>/dev/null; then
  python3 -m venv "$DIR/venv"
  "$DIR/venv/bin/pip" install --quiet --disable-pip-version-check \
    -r "$ROOT/examples/clients/python/requirements.txt" >&2
fi
# Stubs from the .proto of this checkout (generated, never edited; regenerated each run).
rm -rf "$DIR/python-stubs" && mkdir -p "$DIR/python-stubs"
"$DIR/venv/bin/python" -m grpc_tools.protoc -I "$ROOT/proto" \
  --python_out="$DIR/python-stubs" --grpc_python_out="$DIR/python-stubs" sluice/v1/queues.proto
if [[ ! -d "$DIR/node/node_modules/@grpc/grpc-js" ]]; then
  mkdir -p "$DIR/node"
  cp "$ROOT/examples/clients/node/package.json" "$DIR/node/"
  (cd "$DIR/node" && npm install --silent --no-audit --no-fund >&2)
fi
echo "export SLUICE_PYTHON='$DIR/venv/bin/python' PYTHONPATH='$DIR/python-stubs' NODE_PATH='$DIR/node/node_modules' SLUICE_PROTO='$ROOT/proto'"
