#!/usr/bin/env bash
# Start or stop a real Kubernetes 1.20 control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) on 127.0.0.1, for tests.
#
#   scripts/k8s/cluster.sh start STATE_DIR [--owner-pid PID]
#       Builds/caches the binaries on first use, starts everything with fresh
#       state in STATE_DIR, waits until the API server is ready, and writes
#       STATE_DIR/kubeconfig (admin, system:masters) and STATE_DIR/env.
#       With --owner-pid the control plane stops itself when PID exits.
#   scripts/k8s/cluster.sh ensure STATE_DIR [--owner-pid PID]
#       Like start, but reuses a healthy control plane already running in
#       STATE_DIR (several test processes share one; a lock serialises them).
#   scripts/k8s/cluster.sh stop STATE_DIR
#
# No kubelet runs: pods are created and scheduled (if a Node exists) but not started
# (the e2e suite's node agent runs them: docs/e2e.md).
#
# Environment (all optional; the defaults keep everything on 127.0.0.1):
#   SLUICE_K8S_BIND_ADDRESS      API server bind address (the e2e suite uses 0.0.0.0
#                                inside a network namespace of its own, so pods reach it)
#   SLUICE_K8S_ADVERTISE_ADDRESS API server advertise address (endpoints of `kubernetes`)
#   SLUICE_K8S_EXTRA_SANS        more subjectAltNames for its certificate, e.g. IP:10.244.0.1
#   SLUICE_K8S_APISERVER_ARGS    extra kube-apiserver flags (space separated), e.g.
#                                --enable-aggregator-routing=true (webhooks reached at
#                                endpoint IPs: there is no kube-proxy)
set -euo pipefail
BIND_ADDRESS="${SLUICE_K8S_BIND_ADDRESS:-127.0.0.1}"
ADVERTISE_ADDRESS="${SLUICE_K8S_ADVERTISE_ADDRESS:-127.0.0.1}"
EXTRA_SANS="${SLUICE_K8S_EXTRA_SANS:+,$SLUICE_K8S_EXTRA_SANS}"
# shellcheck disable=SC2206
APISERVER_ARGS=(${SLUICE_K8S_APISERVER_ARGS:-})
HERE="$(cd "$(dirname "$0")" && pwd)"
K8S_VERSION=1.20.2
CACHE="${SLUICE_K8S_CACHE:-$HOME/.cache/sluice/k8s-$K8S_VERSION}"
BIN="$CACHE/bin"

cmd="${1:-}"; state="${2:-}"
[[ -n "$cmd" && -n "$state" ]] || { echo "usage: $0 start|stop STATE_DIR [--owner-pid PID]" >&2; exit 2; }
shift 2
owner=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --owner-pid) owner="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

stop() {
  local dir="$1"
  [[ -f "$dir/pids" ]] || return 0
  # Stop in reverse start order: clients first, etcd last.
  for pid in $(tac "$dir/pids"); do kill "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    local alive=0
    for pid in $(cat "$dir/pids"); do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive -eq 0 ]] && break
    sleep 0.2
  done
  for pid in $(cat "$dir/pids"); do kill -9 "$pid" 2>/dev/null || true; done
  rm -f "$dir/pids"
}

if [[ "$cmd" == stop ]]; then
  stop "$state"
  exit 0
fi
if [[ "$cmd" == ensure ]]; then
  mkdir -p "$(dirname "$state")"
  exec 8>"$state.lock"
  flock 8
  if [[ -f "$state/env" && -f "$state/pids" ]]; then
    # shellcheck disable=SC1091
    source "$state/env"
    if curl -sf --cacert "$SLUICE_K8S_CA" -H "Authorization: Bearer $SLUICE_K8S_TOKEN" \
         "$SLUICE_K8S_API/readyz" >/dev/null 2>&1; then
      echo "control plane already running: KUBECONFIG=$state/kubeconfig" >&2
      exit 0
    fi
  fi
  cmd=start
fi
[[ "$cmd" == start ]] || { echo "unknown command $cmd" >&2; exit 2; }

"$HERE/build-k8s.sh" >&2
command -v etcd >/dev/null || "$HERE/install-apt.sh" >&2
command -v openssl >/dev/null || "$HERE/install-apt.sh" >&2

mkdir -p "$state"
state="$(cd "$state" && pwd)"
stop "$state"
rm -rf "$state/etcd" "$state/pki" "$state/logs"
mkdir -p "$state/pki" "$state/logs"
pki="$state/pki"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
ETCD_PORT=$(free_port); ETCD_PEER=$(free_port); API_PORT=$(free_port)
KCM_PORT=$(free_port); SCHED_PORT=$(free_port)

# PKI: a CA, the API server's serving certificate, the service-account key.
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" -days 30 \
  -subj /CN=sluice-test-ca -addext basicConstraints=critical,CA:TRUE \
  -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" \
  -subj /CN=kube-apiserver 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$EXTRA_SANS" > "$pki/ext.cnf"
openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
  -out "$pki/apiserver.crt" -days 30 -extfile "$pki/ext.cnf" 2>/dev/null
openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$TOKEN,admin,admin,system:masters" > "$pki/tokens.csv"

cat > "$state/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: sluice-test
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $pki/ca.crt
users:
- name: admin
  user:
    token: $TOKEN
contexts:
- name: sluice-test
  context: {cluster: sluice-test, user: admin, namespace: default}
current-context: sluice-test
KC

: > "$state/pids"
launch() {
  local name="$1"; shift
  setsid "$@" >"$state/logs/$name.log" 2>&1 < /dev/null 8>&- 9>&- &
  echo $! >> "$state/pids"
}

launch etcd etcd --data-dir "$state/etcd" --name sluice-test \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "sluice-test=http://127.0.0.1:$ETCD_PEER" --unsafe-no-fsync=true 2>/dev/null \
  || true
# etcd 3.4 lacks --unsafe-no-fsync; fall back when it refused the flag.
sleep 0.5
if ! kill -0 "$(tail -1 "$state/pids")" 2>/dev/null; then
  sed -i '$d' "$state/pids"
  launch etcd etcd --data-dir "$state/etcd" --name sluice-test \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "sluice-test=http://127.0.0.1:$ETCD_PEER"
fi

launch kube-apiserver "$BIN/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --secure-port="$API_PORT" --bind-address="$BIND_ADDRESS" --advertise-address="$ADVERTISE_ADDRESS" \
  --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --token-auth-file="$pki/tokens.csv" --authorization-mode=RBAC \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc \
  --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
  --enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota,OwnerReferencesPermissionEnforcement \
  "${APISERVER_ARGS[@]}" --v=1

ready=0
for _ in $(seq 1 240); do
  if curl -sf --cacert "$pki/ca.crt" -H "Authorization: Bearer $TOKEN" \
       "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1; then ready=1; break; fi
  if ! kill -0 "$(sed -n 2p "$state/pids")" 2>/dev/null; then break; fi
  sleep 0.5
done
if [[ $ready -ne 1 ]]; then
  echo "kube-apiserver did not become ready; log tail:" >&2
  tail -30 "$state/logs/kube-apiserver.log" >&2 || true
  stop "$state"
  exit 1
fi

launch kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig="$state/kubeconfig" --authentication-kubeconfig="$state/kubeconfig" \
  --authorization-kubeconfig="$state/kubeconfig" \
  --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
  --use-service-account-credentials=false \
  --controllers='*,-nodeipam' --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --port=0 \
  --leader-elect=false --concurrent-gc-syncs=5 --v=1
launch kube-scheduler "$BIN/kube-scheduler" \
  --kubeconfig="$state/kubeconfig" --authentication-kubeconfig="$state/kubeconfig" \
  --authorization-kubeconfig="$state/kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --port=0 --leader-elect=false --v=1

# Ready means the controllers work too: the ServiceAccount controller has made
# the default ServiceAccount (no pod can be created before that).
ok=0
for _ in $(seq 1 240); do
  if curl -sf --cacert "$pki/ca.crt" -H "Authorization: Bearer $TOKEN" \
       "https://127.0.0.1:$API_PORT/api/v1/namespaces/default/serviceaccounts/default" >/dev/null 2>&1; then ok=1; break; fi
  for pid in $(cat "$state/pids"); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "a control-plane process ($pid) exited; logs in $state/logs:" >&2
      tail -n 5 "$state"/logs/*.log >&2 || true
      stop "$state"
      exit 1
    fi
  done
  sleep 0.5
done
if [[ $ok -ne 1 ]]; then
  echo "controller-manager did not create the default ServiceAccount" >&2
  stop "$state"
  exit 1
fi

cat > "$state/env" <<ENV
KUBECONFIG=$state/kubeconfig
SLUICE_K8S_API=https://127.0.0.1:$API_PORT
SLUICE_K8S_TOKEN=$TOKEN
SLUICE_K8S_CA=$pki/ca.crt
ENV

if [[ -n "$owner" ]]; then
  # Watchdog: stop the control plane when the owner (a test process) exits.
  setsid bash -c "while kill -0 $owner 2>/dev/null; do sleep 1; done; '$HERE/cluster.sh' stop '$state'; rm -rf '$state' '$state.lock'" \
    >/dev/null 2>&1 < /dev/null 8>&- 9>&- &
fi
echo "control plane ready: KUBECONFIG=$state/kubeconfig" >&2
