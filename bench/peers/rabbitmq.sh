#!/usr/bin/env bash
# Starts a private RabbitMQ node in the foreground, on loopback only, next to any
# system RabbitMQ without touching it: its own node name, AMQP port, distribution
# port, epmd (own port, started here), config, mnesia and log directories, cookie
# ($HOME), and no plugins.
#   bench/peers/rabbitmq.sh DIR AMQP_PORT DIST_PORT EPMD_PORT [NODENAME [COOKIE]]
# sluice-bench runs this (`--systems rabbitmq`) in a process group of its own and
# kills the group (node and epmd) when done; by hand, stop it with Ctrl-C.
# With COOKIE (the nodes of a cluster share it) the node uses the epmd already
# listening on EPMD_PORT, started once for all of them, and starts none itself:
# killing one node then leaves the others' epmd alone. The nodes are joined with
# `rabbitmqctl join_cluster` afterwards (sluice-bench does it for `rabbitmq-r3`).
set -euo pipefail
usage="usage: rabbitmq.sh DIR AMQP_PORT DIST_PORT EPMD_PORT [NODENAME [COOKIE]]"
dir="${1:?$usage}"; amqp="${2:?$usage}"; dist="${3:?$usage}"; epmd_port="${4:?$usage}"
node="${5:-sluice-bench-$$@localhost}"
mkdir -p "$dir/home" "$dir/mnesia" "$dir/log"
cat > "$dir/rabbitmq.conf" <<CONF
loopback_users = none
disk_free_limit.absolute = 50MB
CONF
echo "[]." > "$dir/enabled_plugins"
: > "$dir/rabbitmq-env.conf"
cookie="${6:-}"
if [[ -n "$cookie" ]]; then
  printf '%s' "$cookie" > "$dir/home/.erlang.cookie"
  chmod 400 "$dir/home/.erlang.cookie"
else
  epmd -address 127.0.0.1 -port "$epmd_port" &
fi
export HOME="$dir/home" ERL_EPMD_PORT="$epmd_port"
export RABBITMQ_NODENAME="$node" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT="$amqp" RABBITMQ_DIST_PORT="$dist"
export RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_LOGS=-
export RABBITMQ_PID_FILE="$dir/rabbitmq.pid" RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
export RABBITMQ_PLUGINS_EXPAND_DIR="$dir/plugins-expand"
export RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
# No busy-waiting schedulers (the machine is shared and has 2 cores; busy-waiting
# would take CPU from the clients and the other systems); distribution on loopback.
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none -kernel inet_dist_use_interface {127,0,0,1}"
exec /usr/lib/rabbitmq/bin/rabbitmq-server
