#!/usr/bin/env bash
# Makes a self-signed certificate for local HTTPS with HTTP/2 (the browser page's fetch-streaming
# upload needs it): certs/localhost.pem and certs/localhost-key.pem, valid for localhost,
# 127.0.0.1 and ::1 for 825 days. Needs openssl. Existing files are kept unless --force.
#
#   scripts/dev_cert.sh [--force] [output-dir]
#   python -m service --certfile certs/localhost.pem --keyfile certs/localhost-key.pem
#   open https://localhost:8000/ (accept the warning once, or trust the certificate)
set -euo pipefail

force=0
if [ "${1:-}" = "--force" ]; then force=1; shift; fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/../certs}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cert="$out/localhost.pem"
key="$out/localhost-key.pem"

if [ "$force" = 0 ] && [ -s "$cert" ] && [ -s "$key" ]; then
    echo "exists: $cert (use --force to replace)"
    exit 0
fi
command -v openssl >/dev/null || { echo "openssl is required" >&2; exit 1; }

umask 077
# EC P-256: small and fast; browsers want subjectAltName (CN alone is ignored) and at most 825
# days of validity, and Chrome wants serverAuth for a leaf certificate.
openssl req -x509 -new -nodes -sha256 -days 825 \
    -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$key" -out "$cert" \
    -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -addext "keyUsage=critical,digitalSignature" \
    -addext "extendedKeyUsage=serverAuth" 2>/dev/null
chmod 644 "$cert"
echo "wrote $cert"
echo "wrote $key"
