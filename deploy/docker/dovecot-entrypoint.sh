#!/bin/sh
# Entry point of the trial Dovecot image (deploy/docker/dovecot.Dockerfile):
#  - makes the mail directory ($DOVECOT_TRIAL_DIR/mail, a volume) writable by vmail;
#  - when TRIAL_TLS_DIR is set (the compose trial): creates a self-signed certificate there for
#    xaps-proxy's 993/STARTTLS, readable by the proxy's group 10001 (the proxy mounts the
#    volume read-only);
#  - checks the configuration, then runs the command (Dovecot in the foreground).
# Kubernetes runs Dovecot directly (command:), without this script.
set -eu
DIR="${DOVECOT_TRIAL_DIR:-/srv/xaps-trial}"
mkdir -p "$DIR/mail"
chown vmail:vmail "$DIR/mail"
if [ -n "${TRIAL_TLS_DIR:-}" ] && [ ! -s "$TRIAL_TLS_DIR/key.pem" ]; then
  mkdir -p "$TRIAL_TLS_DIR"
  name="${TRIAL_TLS_NAME:-localhost}"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
    -subj "/CN=$name" -addext "subjectAltName=DNS:$name,DNS:localhost,IP:127.0.0.1" \
    -keyout "$TRIAL_TLS_DIR/key.pem" -out "$TRIAL_TLS_DIR/cert.pem" 2>/dev/null
  chown 0:10001 "$TRIAL_TLS_DIR/key.pem" "$TRIAL_TLS_DIR/cert.pem"
  chmod 0640 "$TRIAL_TLS_DIR/key.pem"
  chmod 0644 "$TRIAL_TLS_DIR/cert.pem"
fi
doveconf -n -c /etc/dovecot/dovecot.conf >/dev/null
exec "$@"
