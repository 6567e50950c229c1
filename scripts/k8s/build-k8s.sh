#!/usr/bin/env bash
# Build Kubernetes 1.20.2 from Debian's source package and cache the binaries under
# $SLUICE_K8S_CACHE (default ~/.cache/sluice/k8s-1.20.2/bin): the control plane
# (kube-apiserver, kube-controller-manager, kube-scheduler), the node (kubelet,
# kube-proxy) and the pod sandbox's `pause` (build/pause, static). Idempotent:
# returns at once when cached, and builds only what is missing (a cache made before
# the node was added gets just the node).
# See docs/operator.md ("A real control plane") for the why of each step.
set -euo pipefail

K8S_VERSION=1.20.2
CACHE="${SLUICE_K8S_CACHE:-$HOME/.cache/sluice/k8s-$K8S_VERSION}"
CONTROL_PLANE=(kube-apiserver kube-controller-manager kube-scheduler)
NODE=(kubelet kube-proxy)
BINS=("${CONTROL_PLANE[@]}" "${NODE[@]}" pause)

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
# Only what is missing, in one `go install` (the binaries share most packages).
targets=()
for b in "${CONTROL_PLANE[@]}" "${NODE[@]}"; do
  [[ -x "$CACHE/bin/$b" ]] || targets+=("cmd/$b")
done
if [[ ${#targets[@]} -gt 0 ]]; then
  # The source carries every generated file these binaries need but the OpenAPI
  # definitions (the control plane serves them); `make WHAT=...` would run all the
  # generators over the whole tree first (twice the CPU of the OpenAPI one alone), so
  # generate just that and build directly.
  for b in "${CONTROL_PLANE[@]}"; do
    if [[ ! -x "$CACHE/bin/$b" ]]; then make gen_openapi; break; fi
  done
  hack/make-rules/build.sh "${targets[@]}"
fi
# The sandbox every pod's containers join (the image the kubelet asks containerd for).
mkdir -p _output/bin
gcc -Os -Wall -Werror -static -DVERSION=v3.4-sluice -o _output/bin/pause build/pause/linux/pause.c

# Into place one by one, each by rename: a reader never sees half a binary.
mkdir -p "$CACHE/bin"
for b in "${BINS[@]}"; do
  [[ -x "$CACHE/bin/$b" ]] && continue
  cp "_output/bin/$b" "$CACHE/bin/.$b.tmp"
  mv "$CACHE/bin/.$b.tmp" "$CACHE/bin/$b"
done
cd /
rm -rf "$WORK"
echo "k8s $K8S_VERSION binaries cached in $CACHE/bin"
