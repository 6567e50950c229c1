#!/usr/bin/env bash
# Installs the benchmark's peers from Debian's packages: nats-server (JetStream) and
# rabbitmq-server (quorum queues), plus linux-perf for profiling. Idempotent.
# The packages' own system services are not used (and are kept from starting where
# the machine has no init): `sluice-bench --systems nats,rabbitmq` starts private
# instances on loopback with their own data directories and ports (bench/peers/*.sh).
set -euo pipefail
pkgs=(nats-server rabbitmq-server)
if [[ "${1:-}" == "--with-perf" ]]; then pkgs+=(linux-perf); fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The Debian package may have started a system rabbitmq (and epmd) where an init
# system runs; the bench's instance uses its own node name, ports and epmd port, so
# the two do not collide, but a system broker would steal CPU from the measurement.
if command -v systemctl >/dev/null && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
  echo "note: a system rabbitmq-server is running; stop it for quiet measurements (systemctl stop rabbitmq-server)" >&2
fi
nats-server --version
dpkg-query -W -f='rabbitmq-server ${Version}\n' rabbitmq-server
