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

for image in "${IMAGES[@]}"; do
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
