# syntax=docker/dockerfile:1
# Dovecot 2.3 from Debian 12 — the same packages the test suite runs — for the local trial
# (docker-compose.yml at the repository root) and as a starting point for the Kubernetes pod.
# It carries no configuration of its own: mount one as /etc/dovecot/dovecot.conf (the trial
# mounts deploy/dovecot/xaps-trial.conf, the file the tests include).
#   docker build -f deploy/docker/dovecot.Dockerfile -t xaps-dovecot:2.3 .
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      dovecot-core dovecot-imapd dovecot-lmtpd openssl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 5000 vmail \
 && useradd --system --uid 5000 --gid vmail --home-dir /srv/xaps-trial/mail --no-create-home \
      --shell /usr/sbin/nologin vmail \
 && mkdir -p /srv/xaps-trial/mail /srv/xaps-trial/tls \
 && chown vmail:vmail /srv/xaps-trial/mail
COPY deploy/docker/dovecot-entrypoint.sh /usr/local/bin/dovecot-entrypoint.sh
# 143/993 are xaps-proxy's: in the trial and the pod it shares this network namespace.
EXPOSE 143 993
ENTRYPOINT ["/usr/local/bin/dovecot-entrypoint.sh"]
CMD ["dovecot", "-F", "-c", "/etc/dovecot/dovecot.conf"]
