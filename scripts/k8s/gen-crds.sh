#!/usr/bin/env bash
# Regenerates the CRD YAML from the Rust types (operator/src/crd.rs) into crds/ and
# the chart's crds/ folder. The test operator/tests/crd_drift.rs fails when these
# files differ from what the types generate.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
out=$(cargo run -q -p sluice-operator -- crd)
mkdir -p crds charts/sluice/crds
printf '%s\n' "$out" > crds/queues.sluice.dev.yaml
cp crds/queues.sluice.dev.yaml charts/sluice/crds/queues.sluice.dev.yaml
echo "wrote crds/queues.sluice.dev.yaml and charts/sluice/crds/queues.sluice.dev.yaml"
