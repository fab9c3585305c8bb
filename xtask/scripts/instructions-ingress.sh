#!/bin/bash
# Instructions per plain proxied request of `ferry serve` (user space, one
# worker), which the machine's noise does not touch:
#   xtask/scripts/instructions-ingress.sh BIN [off|file|https]
# off: access log off; file: ferry's access log to a file; https: access log
# off, over HTTPS (keep-alive, the bench's P-256 certificate; the TLS
# version and cipher suite wrk gets are printed). Runs as any user; needs
# valgrind, wrk, curl and openssl. Everything on 127.0.0.1:18090-18092.
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
TLS=()
if [ "$LOG" = https ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=bench.test -addext subjectAltName=DNS:bench.test -keyout tls.key -out tls.crt 2>/dev/null
  cat >> m.yaml <<YAML
---
apiVersion: v1
kind: Secret
metadata: {name: bench-tls}
type: kubernetes.io/tls
data: {tls.crt: $(base64 -w0 tls.crt), tls.key: $(base64 -w0 tls.key)}
YAML
  # The same host over HTTP and HTTPS, as in the bench: no redirect.
  sed -i 's/^metadata: {name: bench}$/metadata: {name: bench, annotations: {nginx.ingress.kubernetes.io\/ssl-redirect: "false"}}/; s/^  ingressClassName: ferry$/  ingressClassName: ferry\n  tls: [{hosts: [bench.test], secretName: bench-tls}]/' m.yaml
  # wrk sends SNI 127.0.0.1, which names no host: the same certificate as default.
  TLS=(--https-addr 127.0.0.1:18092 --default-tls-secret default/bench-tls)
fi
"$BIN" echo --body-only --body ok --addr 127.0.0.1:18090 >/dev/null 2>&1 & ECHO=$!
if [ "$LOG" != file ]; then AL=(--access-log off); RL=warn
else AL=(--access-log "$DIR/access.log"); RL=warn,ferry::access=info; fi
TOKIO_WORKER_THREADS=1 RUST_LOG=$RL valgrind --tool=callgrind --callgrind-out-file="$DIR/out.%p" \
  "$BIN" serve -f m.yaml --http-addr 127.0.0.1:18091 "${TLS[@]}" "${AL[@]}" >"$DIR/serve.log" 2>&1 & VG=$!
URL=http://127.0.0.1:18091/
if [ "$LOG" = https ]; then URL=https://127.0.0.1:18092/; fi
for _ in $(seq 1 100); do curl -sk -o /dev/null -H 'Host: bench.test' $URL && break; sleep 0.3; done
if [ "$LOG" = https ]; then
  # What wrk (OpenSSL, SNI 127.0.0.1) negotiates, seen through the same client library.
  openssl s_client -connect 127.0.0.1:18092 -servername 127.0.0.1 </dev/null 2>/dev/null |
    awk '/^New, /{print "negotiated:", $0}' || true
fi
wrk -t1 -c8 -d3s -H 'Host: bench.test' $URL >/dev/null   # warm-up
callgrind_control -z $VG >/dev/null
N=$(wrk -t1 -c8 -d10s -H 'Host: bench.test' $URL | awk '/requests in/{print $1}')
kill -INT $VG; wait $VG || true
T=$(awk '/^totals:/{print $2}' "$DIR/out.$VG")
if [ -n "${CALLGRIND_OUT:-}" ]; then cp "$DIR/out.$VG" "$CALLGRIND_OUT"; fi
echo "access log $LOG: $N requests, $T instructions, $((T / N)) per request"
