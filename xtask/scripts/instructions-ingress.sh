#!/bin/bash
# Instructions per plain proxied request of `ferry serve` (user space, one
# worker), which the machine's noise does not touch:
#   xtask/scripts/instructions-ingress.sh BIN [off|file]
# off: access log off; file: ferry's access log to a file. Runs as any user;
# needs valgrind, wrk and curl. Everything on 127.0.0.1:18090-18091.
# CALLGRIND_OUT=FILE keeps the profile (for callgrind_annotate).
set -euo pipefail
BIN=$(realpath "$1"); LOG=${2:-off}
DIR=$(mktemp -d); trap 'kill $VG $ECHO 2>/dev/null || true; rm -rf "$DIR"' EXIT
cat > "$DIR/m.yaml" <<'YAML'
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: ferry}
spec: {controller: ferry.dev/ingress-controller}
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  ports: [{name: http, port: 80, targetPort: 18090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-1, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{name: http, port: 18090}]
endpoints: [{addresses: [127.0.0.1]}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: bench}
spec:
  ingressClassName: ferry
  rules:
  - host: bench.test
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: echo, port: {number: 80}}}}]}
YAML
cd "$DIR"
"$BIN" echo --body-only --body ok --addr 127.0.0.1:18090 >/dev/null 2>&1 & ECHO=$!
if [ "$LOG" = off ]; then AL=(--access-log off); RL=warn
else AL=(--access-log "$DIR/access.log"); RL=warn,ferry::access=info; fi
TOKIO_WORKER_THREADS=1 RUST_LOG=$RL valgrind --tool=callgrind --callgrind-out-file="$DIR/out.%p" \
  "$BIN" serve -f m.yaml --http-addr 127.0.0.1:18091 "${AL[@]}" >"$DIR/serve.log" 2>&1 & VG=$!
for _ in $(seq 1 100); do curl -s -o /dev/null -H 'Host: bench.test' http://127.0.0.1:18091/ && break; sleep 0.3; done
wrk -t1 -c8 -d3s -H 'Host: bench.test' http://127.0.0.1:18091/ >/dev/null   # warm-up
callgrind_control -z $VG >/dev/null
N=$(wrk -t1 -c8 -d10s -H 'Host: bench.test' http://127.0.0.1:18091/ | awk '/requests in/{print $1}')
kill -INT $VG; wait $VG || true
T=$(awk '/^totals:/{print $2}' "$DIR/out.$VG")
if [ -n "${CALLGRIND_OUT:-}" ]; then cp "$DIR/out.$VG" "$CALLGRIND_OUT"; fi
echo "access log $LOG: $N requests, $T instructions, $((T / N)) per request"
