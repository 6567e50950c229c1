#!/usr/bin/env bash
# Starts a private NATS JetStream server in the foreground, on loopback only.
#   bench/peers/nats.sh STORE_DIR PORT [NAME CLUSTER_PORT ROUTES]
# File storage under STORE_DIR. Debian's nats-server 2.9 has no per-write fsync
# setting: JetStream writes each message to the file (page cache) before its PubAck
# and fsyncs on an interval (see docs/benchmarks.md), which favours NATS against
# Sluice's `fsync: always`. With NAME, CLUSTER_PORT and ROUTES (comma-separated
# nats://127.0.0.1:PORT of the other servers' cluster ports) it is one server of a
# cluster named `bench`, for streams of 3 replicas.
# sluice-bench runs this (`--systems nats` or `nats-r3`); it works by hand too.
set -euo pipefail
usage="usage: nats.sh STORE_DIR PORT [NAME CLUSTER_PORT ROUTES]"
store="${1:?$usage}"
port="${2:?$usage}"
mkdir -p "$store"
if [[ $# -ge 5 ]]; then
  exec nats-server -js -sd "$store" -a 127.0.0.1 -p "$port" -n "$3" \
    --cluster_name bench --cluster "nats://127.0.0.1:$4" --routes "$5"
fi
exec nats-server -js -sd "$store" -a 127.0.0.1 -p "$port"
