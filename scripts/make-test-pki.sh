#!/usr/bin/env bash
# make-test-pki.sh OUTDIR [USERS...]
#
# TEST/STAGING ONLY. Makes, in OUTDIR:
#   ca.crt, ca.key            a throw-away certificate authority (EC P-256, 30 days)
#   server.crt, server.key    a broker certificate for 127.0.0.1 / ::1 / localhost (serverAuth and
#                             clientAuth: also a NATS node's route certificate, routes being mutual TLS)
#                             (plus $FLEDGER_PKI_HOSTS, e.g. "broker.plant7.lan 10.0.0.5"),
#                             signed by that CA
#   passwd                    a mosquitto password file (mosquitto_passwd -b, PBKDF2-SHA512)
#   <user>.password           a random password per user (0600), for --password-file
# Users default to: coordinator monitor device-1 device-2.
#
# Nothing it writes is ever committed: every run makes new keys and passwords. For a real
# fleet use your own PKI (or this script once on an offline machine, keeping ca.key offline)
# and see deploy/README.md. Re-running into the same OUTDIR replaces everything.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
shift
users=("$@")
if [[ ${#users[@]} -eq 0 ]]; then
    users=(coordinator monitor device-1 device-2)
fi
for user in "${users[@]}"; do
    # Same rule as fledger device ids (federation/topics.py); also keeps ACL %u patterns exact.
    if [[ ! "$user" =~ ^[A-Za-z0-9_-]{1,64}$ ]]; then
        echo "make-test-pki: user name '$user' must be 1-64 of A-Z a-z 0-9 _ -" >&2
        exit 2
    fi
done

command -v openssl >/dev/null || { echo "make-test-pki: openssl not found" >&2; exit 1; }
PASSWD_TOOL=$(command -v mosquitto_passwd || true)
if [[ -z "$PASSWD_TOOL" ]]; then
    echo "make-test-pki: mosquitto_passwd not found (apt-get install mosquitto; scripts/setup.sh does)." >&2
    echo "  Without it, create the password file on the broker host: mosquitto_passwd -c FILE USER" >&2
    exit 1
fi

umask 077
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

days=30
hosts="127.0.0.1 ::1 localhost ${FLEDGER_PKI_HOSTS:-}"
san=""
for h in $hosts; do
    if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
san=${san%,}

# CA
openssl ecparam -name prime256v1 -genkey -noout -out "$out/ca.key" 2>/dev/null
openssl req -new -x509 -sha256 -days "$days" -key "$out/ca.key" -out "$out/ca.crt" \
    -subj "/O=fledger TEST ONLY/CN=fledger test CA $(date -u +%Y%m%dT%H%M%SZ)" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# Server key + certificate signed by the CA
openssl ecparam -name prime256v1 -genkey -noout -out "$out/server.key" 2>/dev/null
openssl req -new -sha256 -key "$out/server.key" -out "$tmp/server.csr" \
    -subj "/O=fledger TEST ONLY/CN=localhost" 2>/dev/null
cat > "$tmp/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san
EXT
openssl x509 -req -sha256 -days "$days" -in "$tmp/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -CAserial "$tmp/ca.srl" -extfile "$tmp/server.ext" -out "$out/server.crt" 2>/dev/null
openssl verify -CAfile "$out/ca.crt" "$out/server.crt" >/dev/null

# Broker users: one random password each, and the mosquitto password file (hashes only)
rm -f "$out/passwd"
: > "$out/passwd"
for user in "${users[@]}"; do
    password=$(openssl rand -base64 24 | tr -d '/+=\n')
    printf '%s\n' "$password" > "$out/$user.password"
    chmod 600 "$out/$user.password"
    "$PASSWD_TOOL" -b "$out/passwd" "$user" "$password"
done

chmod 600 "$out/ca.key" "$out/server.key" "$out/passwd"
chmod 644 "$out/ca.crt" "$out/server.crt"
echo "make-test-pki: TEST CA, server certificate and ${#users[@]} broker users in $out"
