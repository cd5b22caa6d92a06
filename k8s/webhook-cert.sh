#!/usr/bin/env bash
# The injection webhook's certificate: a CA of its own, a server certificate for the
# control plane Service's DNS names signed by it, the Secret the control plane mounts, and
# the CA in the MutatingWebhookConfiguration's caBundle (so the API server trusts the
# webhook). Run after `kubectl apply -f k8s/control-plane.yaml`; run again to rotate (the
# control plane reads the certificate when it starts: restart it afterwards).
#
#   k8s/webhook-cert.sh                 # makes the files in a temporary directory, applies
#   k8s/webhook-cert.sh --out DIR       # makes them in DIR and applies nothing
#
# Needs openssl (1.1.1 or later) and, unless --out is given, kubectl.
set -euo pipefail
NAMESPACE="${NAMESPACE:-pilotfish}"
SERVICE="${SERVICE:-control-plane}"
SECRET="${SECRET:-control-plane-webhook-tls}"
WEBHOOK="${WEBHOOK:-pilotfish-sidecar-injector}"
DAYS="${DAYS:-365}"

out=""
if [ "${1:-}" = "--out" ]; then
    out="${2:?--out needs a directory}"
    mkdir -p "$out"
    dir="$out"
else
    dir="$(mktemp -d)"
    trap 'rm -rf "$dir"' EXIT
fi

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days "$DAYS" \
    -subj "/CN=pilotfish webhook CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$dir/tls.key" -out "$dir/tls.csr" \
    -subj "/CN=$SERVICE.$NAMESPACE.svc" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s.%s.svc\nextendedKeyUsage=serverAuth\n' \
    "$SERVICE" "$SERVICE" "$NAMESPACE" "$SERVICE" "$NAMESPACE" > "$dir/ext.cnf"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -days "$DAYS" -extfile "$dir/ext.cnf" -out "$dir/tls.crt" 2>/dev/null
rm -f "$dir/tls.csr" "$dir/ext.cnf" "$dir/ca.srl"

if [ -n "$out" ]; then
    echo "wrote $out/ca.crt, $out/tls.crt, $out/tls.key"
    exit 0
fi
kubectl -n "$NAMESPACE" create secret tls "$SECRET" \
    --cert "$dir/tls.crt" --key "$dir/tls.key" --dry-run=client -o yaml | kubectl apply -f -
ca_bundle="$(base64 < "$dir/ca.crt" | tr -d '\n')"
kubectl patch mutatingwebhookconfiguration "$WEBHOOK" --type json \
    -p "[{\"op\": \"add\", \"path\": \"/webhooks/0/clientConfig/caBundle\", \"value\": \"$ca_bundle\"}]"
kubectl -n "$NAMESPACE" rollout restart deployment "$SERVICE"
