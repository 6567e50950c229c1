#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager and kube-scheduler 1.20.2 from
# Debian's source package and cache the binaries under $SLUICE_K8S_CACHE
# (default ~/.cache/sluice/k8s-1.20.2). Idempotent: returns at once when cached.
# See docs/operator.md ("A real control plane") for the why of each step.
set -euo pipefail

K8S_VERSION=1.20.2
CACHE="${SLUICE_K8S_CACHE:-$HOME/.cache/sluice/k8s-$K8S_VERSION}"
BINS=(kube-apiserver kube-controller-manager kube-scheduler)

have_all() {
  for b in "${BINS[@]}"; do [[ -x "$CACHE/bin/$b" ]] || return 1; done
}
if have_all; then
  echo "k8s $K8S_VERSION binaries cached in $CACHE/bin"
  exit 0
fi

mkdir -p "$CACHE"
# One builder at a time (parallel test binaries may all ask for the build).
exec 9>"$CACHE/.build.lock"
flock 9
if have_all; then exit 0; fi

SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"

if ! command -v go >/dev/null || ! command -v etcd >/dev/null || ! command -v rsync >/dev/null \
   || [[ ! -d /usr/share/gocode/src/github.com/modern-go/reflect2 ]]; then
  "$(dirname "$0")/install-apt.sh"
fi

WORK="$CACHE/build"
rm -rf "$WORK"
mkdir -p "$WORK"
cd "$WORK"
apt-get source --download-only kubernetes >/dev/null
tar xzf kubernetes_*.orig.tar.gz
SRC=$(find . -maxdepth 1 -type d -name 'kubernetes*' | head -1)
cd "$SRC"

# reflect2 1.0.1 predates Go 1.18 and panics in reflect.mapiterinit under Go 1.19.
R2=vendor/github.com/modern-go/reflect2
rm -f "$R2"/*.go "$R2"/*.s
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$R2"/
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$R2"/ 2>/dev/null || true

export GOFLAGS="${GOFLAGS:-}" GO111MODULE=on
# The source carries every generated file these binaries need but the OpenAPI
# definitions; `make WHAT=...` would run all the generators over the whole tree first
# (twice the CPU of the OpenAPI one alone), so generate just that and build directly.
make gen_openapi
hack/make-rules/build.sh cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler

mkdir -p "$CACHE/bin.tmp"
for b in "${BINS[@]}"; do cp "_output/bin/$b" "$CACHE/bin.tmp/"; done
rm -rf "$CACHE/bin"
mv "$CACHE/bin.tmp" "$CACHE/bin"
cd /
rm -rf "$WORK"
echo "k8s $K8S_VERSION binaries cached in $CACHE/bin"
