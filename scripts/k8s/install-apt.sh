#!/usr/bin/env bash
# Debian packages needed to build and run the control plane: Go (build), etcd,
# rsync (Kubernetes make rules), reflect2 1.0.2 (vendored fix), openssl, kubectl 1.20
# client, python3-pip (for the helm/kubectl wheel), iproute2 + util-linux (network
# namespaces, unshare, mount: the e2e suite and the network-partition test), mold
# (scripts/test links with it: a fraction of GNU ld's time for the dozen large test
# binaries), gcc and libc6-dev (the static `pause`), promtool, containerd, runc,
# buildah, and what the real node of the e2e suite needs besides them
# (containernetworking-plugins for pod networks, iptables and conntrack for
# kube-proxy), and a deb-src entry for `apt-get source kubernetes`. Idempotent.
set -euo pipefail
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"

SRC_LIST=/etc/apt/sources.list.d/sluice-debian-src.sources
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ /etc/apt/sources.list 2>/dev/null \
   && ! grep -qs '^deb-src' /etc/apt/sources.list 2>/dev/null; then
  URIS=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  URIS=${URIS:-http://deb.debian.org/debian}
  $SUDO tee "$SRC_LIST" >/dev/null <<SRC
Types: deb-src
URIs: $URIS
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  NEED_UPDATE=1
fi

PKGS=(golang-go etcd-server rsync golang-github-modern-go-reflect2-dev openssl python3-pip unzip make util-linux curl iproute2 mold gcc libc6-dev)
MISSING=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || MISSING+=("$p")
done
if [[ ${#MISSING[@]} -gt 0 || -n "${NEED_UPDATE:-}" ]]; then
  $SUDO apt-get update -qq
fi
if [[ ${#MISSING[@]} -gt 0 ]]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${MISSING[@]}"
fi
# Without their recommended extras (and nothing of them is started as a service):
# promtool (prometheus: checks and unit-tests the chart's alerting rules), and
# containerd, runc and buildah (the images built and run: integration/tests/images.rs),
# and the real node's CNI plugins, iptables and conntrack (e2e, docs/e2e.md).
LEAN=()
command -v promtool >/dev/null || LEAN+=(prometheus)
for p in containerd runc buildah containernetworking-plugins iptables conntrack; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || LEAN+=("$p")
done
if [[ ${#LEAN[@]} -gt 0 ]]; then
  [[ ${#MISSING[@]} -gt 0 || -n "${NEED_UPDATE:-}" ]] || $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${LEAN[@]}"
fi
