#!/usr/bin/env bash
# Builds the test images (sluice-broker, sluice-sidecar, sluice-operator,
# sluice-e2e-app) from binaries a test run built, through the release Dockerfile's
# own runtime stages (e2e/images/Dockerfile, `--build-arg BINARIES=prebuilt`), and
# writes each as an OCI archive that `ctr images import` takes.
#
#   scripts/images/build.sh BIN_DIR OUT_DIR [TAG] [IMAGE...]
#
# BIN_DIR holds the binaries (e.g. target/debug); OUT_DIR receives <image>.tar and
# buildah's own storage (vfs: no overlay mounts needed); TAG defaults to `test`.
# The binaries are glibc ones: each image gets the shared libraries `ldd` names,
# and nothing else (no shell, no package manager). Needs buildah (Debian's package;
# scripts/k8s/install-apt.sh installs it).
#
# The image `pause` is the pod sandbox of a real node (scripts/k8s/node.sh): the static
# binary scripts/k8s/build-k8s.sh compiles from the Kubernetes source (build/pause),
# alone in an image named k8s.gcr.io/pause:3.2, the kubelet 1.20's default; TAG does
# not apply to it.
set -euo pipefail
BIN_DIR=$(realpath "$1")
OUT=$(realpath -m "$2")
TAG=${3:-test}
shift $(( $# < 3 ? $# : 3 ))
IMAGES=("$@")
[[ ${#IMAGES[@]} -gt 0 ]] || IMAGES=(broker sidecar operator e2e-app)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
BUILDAH=(buildah --storage-driver vfs --root "$OUT/storage" --runroot "$OUT/run")

pause_image() {
  local bin="${SLUICE_K8S_CACHE:-$HOME/.cache/sluice/k8s-1.20.2}/bin/pause"
  local name=k8s.gcr.io/pause:3.2
  [[ -x "$bin" ]] || bash "$ROOT/scripts/k8s/build-k8s.sh" >&2
  local ctr
  ctr=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" copy --quiet "$ctr" "$bin" /pause >/dev/null
  # 65535: the user the upstream image runs as.
  "${BUILDAH[@]}" config --user 65535:65535 --entrypoint '["/pause"]' "$ctr"
  "${BUILDAH[@]}" commit --quiet "$ctr" "$name" >/dev/null
  "${BUILDAH[@]}" rm "$ctr" >/dev/null
  rm -f "$OUT/pause.tar"
  "${BUILDAH[@]}" push --quiet "$name" "oci-archive:$OUT/pause.tar:$name"
  echo "$OUT/pause.tar"
}

for image in "${IMAGES[@]}"; do
  if [[ "$image" == pause ]]; then pause_image; continue; fi
  bin=sluice-$image
  ctx="$OUT/context-$image"
  rm -rf "$ctx"
  mkdir -p "$ctx/prebuilt/out" "$ctx/prebuilt/runtime"
  cp "$BIN_DIR/$bin" "$ctx/prebuilt/out/"
  # The loader and every library the binary names, at the paths it names them by.
  for lib in $(ldd "$BIN_DIR/$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$ctx/prebuilt/runtime$(dirname "$lib")"
    cp -L "$lib" "$ctx/prebuilt/runtime$lib"
  done
  "${BUILDAH[@]}" bud --quiet --layers=false \
    -f "$ROOT/e2e/images/Dockerfile" --target "$image" \
    --build-arg BINARIES=prebuilt -t "$bin:$TAG" "$ctx" >/dev/null
  rm -f "$OUT/$image.tar"
  "${BUILDAH[@]}" push --quiet "$bin:$TAG" "oci-archive:$OUT/$image.tar:$bin:$TAG"
  rm -rf "$ctx"
  echo "$OUT/$image.tar"
done
