#!/usr/bin/env bash
# schemathesis against a live `pie serve` (not part of the test suite): one run with an admin
# token, one with a tenant token (client-1, human with the client group). Only 5xx count as
# failures (`not_a_server_error`). Needs `pip install schemathesis` in the venv.
#   bench/schemathesis_run.sh [max-examples]   (PIE_BENCH_DATABASE_URL / PIE_TEST_DATABASE_URL server)
set -euo pipefail
cd "$(dirname "$0")/.."
EXAMPLES="${1:-30}"
SERVER_URL="${PIE_BENCH_DATABASE_URL:-${PIE_TEST_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}}"
DB="pie_fuzz_$RANDOM$RANDOM"
psql "$SERVER_URL" -qc "CREATE DATABASE $DB"
DATA=$(mktemp -d /tmp/pie-fuzz-XXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export PIE_DATABASE_URL="${SERVER_URL%/*}/$DB" PIE_JWT_SECRET=fuzz PIE_DATA_DIR="$DATA" PIE_LOG_LEVEL=warning PIE_PUBLIC_URL="http://127.0.0.1:$PORT"
.venv/bin/pie migrate >/dev/null
.venv/bin/pie serve --port "$PORT" >"$DATA/serve.log" 2>&1 &
PID=$!
cleanup() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; psql "$SERVER_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)"; }
trap cleanup EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/v2/health" >/dev/null && break; sleep 0.3; done
ADMIN=$(.venv/bin/pie token --admin)
TENANT=$(.venv/bin/pie token --group client:client-1 --username alice --sub alice)
B="http://127.0.0.1:$PORT"
curl -sf -XPOST "$B/v2/clients" -H "Authorization: Bearer $ADMIN" -H 'content-type: application/json' -d '{"client_id":"client-1","name":"One"}' >/dev/null
curl -sf -XPOST "$B/v2/models" -H "Authorization: Bearer $ADMIN" -H 'content-type: application/json' \
  -d '{"id":"m","name":"m","description":"","handlers":{"training":{"type":"in_process","value":"echo"},"inference":{"type":"in_process","value":"echo"}}}' >/dev/null
curl -sf -XPOST "$B/v2/models/m/new_version" -H "Authorization: Bearer $ADMIN" -H 'content-type: application/json' -d '{"version":"1"}' >/dev/null
curl -sf -XPOST "$B/v2/clients/client-1/domains" -H "Authorization: Bearer $ADMIN" -H 'content-type: application/json' -d '{"domain_id":"d","features":[]}' >/dev/null
status=0
for who in ADMIN TENANT; do
  echo "== schemathesis as $who"
  .venv/bin/schemathesis run "$B/v2/openapi.json" -H "Authorization: Bearer ${!who}" \
    --checks not_a_server_error -n "$EXAMPLES" --continue-on-failure --request-timeout 30 --seed 8 || status=1
done
grep -c "unhandled error" "$DATA/serve.log" | sed 's/^/server log "unhandled error" lines: /' || true
exit $status
