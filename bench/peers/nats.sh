#!/usr/bin/env bash
# Starts a private NATS JetStream server in the foreground, on loopback only.
#   bench/peers/nats.sh STORE_DIR PORT
# File storage under STORE_DIR. Debian's nats-server 2.9 has no per-write fsync
# setting: JetStream writes each message to the file (page cache) before its PubAck
# and fsyncs on an interval (see docs/benchmarks.md), which favours NATS against
# Sluice's `fsync: always`.
# sluice-bench runs this (`--systems nats`); it works by hand too.
set -euo pipefail
store="${1:?usage: nats.sh STORE_DIR PORT}"
port="${2:?usage: nats.sh STORE_DIR PORT}"
mkdir -p "$store"
exec nats-server -js -sd "$store" -a 127.0.0.1 -p "$port"
