#!/bin/sh
# First start: write the configuration (fresh secrets, KEK in /etc/bastion) from the
# environment; later starts use it as it is. Then serve with $BASTION_WORKERS workers.
set -eu
if [ ! -f "$BASTION_CONFIG" ]; then
    bastion init --config "$BASTION_CONFIG" \
        --server-name "${BASTION_SERVER_NAME:?set BASTION_SERVER_NAME}" \
        --data-dir /var/lib/bastion --bind 0.0.0.0 --port 8008 \
        --database-url "${BASTION_DATABASE_URL:?set BASTION_DATABASE_URL}"
    if [ -n "${BASTION_REDIS_URL:-}" ]; then
        printf 'redis:\n  url: %s\n' "$BASTION_REDIS_URL" >> "$BASTION_CONFIG"
    fi
    # nginx (the only client) runs in the compose network; admin API from there only.
    printf 'trusted_proxies: ["%s"]\n' "${BASTION_TRUSTED_PROXY:-172.16.0.0/12}" >> "$BASTION_CONFIG"
    printf 'metrics:\n  enabled: true\n  listen: {host: 0.0.0.0, port: 9108}\n' >> "$BASTION_CONFIG"
fi
exec bastion serve --workers "${BASTION_WORKERS:-2}"
