#!/usr/bin/env bash
# Start or stop a real Kubernetes 1.20 node beside the control plane of cluster.sh:
# containerd (its CRI plugin, runc, CNI bridge networking), the kubelet and kube-proxy
# (iptables), with the images of an OCI archive directory imported.
#
#   scripts/k8s/node.sh start STATE_DIR --kubeconfig FILE --node NAME --ip IP \
#       --bridge BRIDGE --pod-cidr CIDR --dns IP [--images DIR]
#   scripts/k8s/node.sh stop STATE_DIR
#
# Only inside a world of its own (the e2e harness's `unshare --net --mount --pid`):
# it mounts tmpfs over the few host paths the kubelet 1.20 cannot be told to move
# (/var/log/pods, /var/log/containers) and writes iptables rules, so it refuses to
# run unless SLUICE_NODE_PRIVATE=1 says the mount and network namespaces are private.
# The bridge must exist with IP on it (the harness makes it); pods get addresses of
# CIDR from the CNI bridge plugin, behind it. Everything else lives in STATE_DIR.
# Logs: STATE_DIR/logs/{containerd,kubelet,kube-proxy}.log; pids in STATE_DIR/pids.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
K8S_VERSION=1.20.2
CACHE="${SLUICE_K8S_CACHE:-$HOME/.cache/sluice/k8s-$K8S_VERSION}"
BIN="$CACHE/bin"
# The sandbox image the kubelet 1.20 asks for by default (its --pod-infra-container-image).
PAUSE_IMAGE=k8s.gcr.io/pause:3.2

cmd="${1:-}"; state="${2:-}"
[[ -n "$cmd" && -n "$state" ]] || { echo "usage: $0 start|stop STATE_DIR ..." >&2; exit 2; }
shift 2

stop() {
  local dir="$1"
  [[ -f "$dir/pids" ]] || return 0
  for pid in $(tac "$dir/pids"); do kill "$pid" 2>/dev/null || true; done
  sleep 1
  for pid in $(cat "$dir/pids"); do kill -9 "$pid" 2>/dev/null || true; done
  rm -f "$dir/pids"
}
if [[ "$cmd" == stop ]]; then stop "$state"; exit 0; fi
[[ "$cmd" == start ]] || { echo "unknown command $cmd" >&2; exit 2; }
[[ "${SLUICE_NODE_PRIVATE:-}" == 1 ]] || {
  echo "$0: only in private mount and network namespaces (set SLUICE_NODE_PRIVATE=1 there)" >&2
  exit 2
}

kubeconfig="" node="" ip="" bridge="" cidr="" dns="" images=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --kubeconfig) kubeconfig="$2"; shift 2 ;;
    --node) node="$2"; shift 2 ;;
    --ip) ip="$2"; shift 2 ;;
    --bridge) bridge="$2"; shift 2 ;;
    --pod-cidr) cidr="$2"; shift 2 ;;
    --dns) dns="$2"; shift 2 ;;
    --images) images="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
for v in kubeconfig node ip bridge cidr dns; do
  [[ -n "${!v}" ]] || { echo "$0 start: --$v is required" >&2; exit 2; }
done
for b in kubelet kube-proxy pause; do
  [[ -x "$BIN/$b" ]] || "$HERE/build-k8s.sh" >&2
done
command -v containerd >/dev/null && command -v runc >/dev/null && [[ -x /usr/lib/cni/bridge ]] \
  || "$HERE/install-apt.sh" >&2

mkdir -p "$state"
state="$(cd "$state" && pwd)"
stop "$state"
rm -rf "$state/logs" "$state/cni" "$state/kubelet-config.yaml"
mkdir -p "$state/logs" "$state/cni/net.d" "$state/cni/ipam" "$state/kubelet" "$state/containerd"
for d in /var/log/pods /var/log/containers; do
  mkdir -p "$d"
  mountpoint -q "$d" || mount -t tmpfs -o mode=0755 tmpfs "$d"
done

# Pod networking: the bridge plugin puts each pod on the world's bridge, which routes
# for them (the node IP is their gateway); portmap for hostPorts. Replies of a pod to
# a pod that reached it through a Service IP cross the bridge: they must pass the
# iptables rules kube-proxy wrote to be un-NATed.
sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.ipv4.ip_forward=1
gateway="$ip"
cat > "$state/cni/net.d/10-sluice.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "sluice",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$state/cni/ipam",
        "ranges": [[{"subnet": "$cidr", "rangeStart": "${cidr%.*.*}.1.2", "gateway": "$gateway"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON

cat > "$state/containerd.toml" <<TOML
version = 2
root = "$state/containerd/root"
state = "$state/containerd/state"
[grpc]
  address = "$state/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # The kubelet asks for negative OOM scores (-998 for the sandbox), which need
  # CAP_SYS_RESOURCE; test machines may not grant it (these VMs do not): keep the
  # scores at or above containerd's own, as rootless setups do.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$state/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
TOML
sock="$state/containerd/containerd.sock"
containerd --config "$state/containerd.toml" >"$state/logs/containerd.log" 2>&1 &
echo $! >> "$state/pids"
for _ in $(seq 1 100); do
  ctr --address "$sock" version >/dev/null 2>&1 && break
  sleep 0.1
done
ctr --address "$sock" version >/dev/null

# Images into the namespace the CRI plugin reads, under the names a pod spec's short
# name resolves to (`sluice-broker:e2e` is docker.io/library/sluice-broker:e2e to the
# CRI plugin; an archive names it by its short name). The pause image among them is
# the one scripts/images/build.sh makes from build/pause of the Kubernetes source.
if [[ -n "$images" ]]; then
  for tar in "$images"/*.tar; do
    names=$(ctr --address "$sock" -n k8s.io images import "$tar" | sed -n 's/^unpacking \([^ ]*\) .*/\1/p')
    for name in $names; do
      case "$name" in
        */*) ;;
        *) ctr --address "$sock" -n k8s.io images tag --force "$name" "docker.io/library/$name" >/dev/null ;;
      esac
    done
  done
fi
# Listed first, then searched: `ctr ... | grep -q` under pipefail fails whenever grep
# stops reading before ctr has written its last line (SIGPIPE).
listed=$(ctr --address "$sock" -n k8s.io images ls -q)
grep -qx "$PAUSE_IMAGE" <<<"$listed" || {
  echo "$0: no $PAUSE_IMAGE among the imported images (scripts/images/build.sh ... pause)" >&2
  exit 1
}

cat > "$state/kubelet-config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
cgroupDriver: cgroupfs
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
clusterDNS: [$dns]
clusterDomain: cluster.local
failSwapOn: false
# The images are imported, never pulled: the kubelet must not collect them, nor evict
# pods over a test machine's disk use.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "0%", nodefs.available: "0%", imagefs.available: "0%"}
serializeImagePulls: false
YAML
"$BIN/kubelet" \
  --config "$state/kubelet-config.yaml" \
  --kubeconfig "$kubeconfig" \
  --container-runtime remote \
  --container-runtime-endpoint "unix://$sock" \
  --pod-infra-container-image "$PAUSE_IMAGE" \
  --root-dir "$state/kubelet" \
  --cert-dir "$state/kubelet/pki" \
  --hostname-override "$node" \
  --node-ip "$ip" \
  >"$state/logs/kubelet.log" 2>&1 &
echo $! >> "$state/pids"

# conntrack limits are the host's, shared by every namespace: left alone.
"$BIN/kube-proxy" \
  --kubeconfig "$kubeconfig" \
  --hostname-override "$node" \
  --proxy-mode iptables \
  --cluster-cidr "$cidr" \
  --conntrack-max-per-core 0 \
  --conntrack-tcp-timeout-established 0 \
  --conntrack-tcp-timeout-close-wait 0 \
  --metrics-bind-address 127.0.0.1:10249 \
  >"$state/logs/kube-proxy.log" 2>&1 &
echo $! >> "$state/pids"

echo "node $node started (containerd $sock); the Node object turns Ready when the kubelet is"
