#!/usr/bin/env bash
# The mesh CA for the control plane's replicas: an offline root (kept out of the cluster) and
# an intermediate that signs workload certificates, in the Secret the control plane mounts.
# Both replicas sign with the same intermediate, so a certificate from either verifies
# everywhere. Run once after `kubectl apply -f k8s/control-plane.yaml` (keep root.key
# offline: it makes the next intermediate); run again with the same root to renew the
# intermediate, then restart the control plane.
#
#   k8s/ca-cert.sh                      # new root and intermediate in a temporary directory
#   k8s/ca-cert.sh --out DIR            # writes them to DIR (reusing DIR/root.*) and applies nothing
#
# Needs openssl (1.1.1 or later) and, unless --out is given, kubectl.
set -euo pipefail
NAMESPACE="${NAMESPACE:-pilotfish}"
SECRET="${SECRET:-pilotfish-ca}"
TRUST_DOMAIN="${TRUST_DOMAIN:-cluster.local}"
ROOT_DAYS="${ROOT_DAYS:-3650}"
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
umask 077

cat > "$dir/ca.cnf" <<CNF
basicConstraints=critical,CA:TRUE,pathlen:0
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid:always
CNF
if [ ! -f "$dir/root.key" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$dir/root.key" -out "$dir/root.crt" -days "$ROOT_DAYS" \
        -subj "/O=pilotfish/CN=pilotfish root CA for $TRUST_DOMAIN" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:1" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.csr" \
    -subj "/O=pilotfish/CN=pilotfish intermediate CA for $TRUST_DOMAIN" 2>/dev/null
openssl x509 -req -in "$dir/ca.csr" -CA "$dir/root.crt" -CAkey "$dir/root.key" \
    -CAcreateserial -days "$DAYS" -extfile "$dir/ca.cnf" -out "$dir/ca.crt" 2>/dev/null
cp "$dir/root.crt" "$dir/roots.pem"
rm -f "$dir/ca.csr" "$dir/ca.cnf" "$dir/root.srl"

if [ -n "$out" ]; then
    echo "wrote $out/ca.crt, $out/ca.key, $out/roots.pem (and $out/root.key: keep it offline)"
    exit 0
fi
kubectl -n "$NAMESPACE" create secret generic "$SECRET" \
    --from-file=ca.crt="$dir/ca.crt" --from-file=ca.key="$dir/ca.key" \
    --from-file=roots.pem="$dir/roots.pem" --dry-run=client -o yaml | kubectl apply -f -
echo "root.key was in a temporary directory and is gone: rerun with --out DIR to keep one"
kubectl -n "$NAMESPACE" rollout restart deployment control-plane
