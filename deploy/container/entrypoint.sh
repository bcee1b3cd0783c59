#!/bin/sh
# The container's entry point: create the data directory on first start, then run the service.
#   SIGNBRIDGE_DATA_DIR       the volume (default /var/lib/signbridge)
#   SIGNBRIDGE_DATABASE_URL   PostgreSQL instead of SQLite in the data directory (read by signbridge itself)
#   SIGNBRIDGE_INIT_DEMO=1    create the Demo Corp organization on first start (prints its API token once)
#   SIGNBRIDGE_TLS_CERT, SIGNBRIDGE_TLS_KEY   PEM files for HTTPS
#   SIGNBRIDGE_HOST, SIGNBRIDGE_PORT, SIGNBRIDGE_WORKERS, SIGNBRIDGE_METRICS_ADDRESS
# Arguments are added to `signbridge server run`.
set -eu

data_dir=${SIGNBRIDGE_DATA_DIR:-/var/lib/signbridge}
if [ ! -f "$data_dir/server.json" ]; then
    if [ "${SIGNBRIDGE_INIT_DEMO:-0}" = 1 ]; then
        signbridge server init --data-dir "$data_dir" --demo
    else
        signbridge server init --data-dir "$data_dir"
    fi
fi

set -- --data-dir "$data_dir" --host "${SIGNBRIDGE_HOST:-0.0.0.0}" --port "${SIGNBRIDGE_PORT:-8443}" \
    --workers "${SIGNBRIDGE_WORKERS:-2}" --log-format json --audit-log \
    --metrics-address "${SIGNBRIDGE_METRICS_ADDRESS:-0.0.0.0:9464}" "$@"
if [ -n "${SIGNBRIDGE_TLS_CERT:-}" ]; then
    set -- "$@" --tls-cert "$SIGNBRIDGE_TLS_CERT" --tls-key "${SIGNBRIDGE_TLS_KEY:?SIGNBRIDGE_TLS_KEY goes with SIGNBRIDGE_TLS_CERT}"
fi
exec signbridge server run "$@"
