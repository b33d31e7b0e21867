#!/usr/bin/env bash
# Admin API examples for the prepaid_credits filter (Kong with a database; in DB-less mode the
# Admin API is read-only, so use `./admin-api.sh dbless`, which posts kong.yaml to /config).
#
#   ./admin-api.sh setup            service, routes, key-auth, consumers (any Kong 3.x)
#   ./admin-api.sh plugins          Kong 3.9+: the filter as a plugin per route; change the price;
#                                   disable it; delete it
#   ./admin-api.sh filter-chains    Kong 3.5–3.8 (also 3.9/3.10): the same with filter chains
#   ./admin-api.sh dbless           Kong DB-less: load kong.yaml (3.9+) or kong-3.5-3.8.yaml
#   ./admin-api.sh check            is the filter installed, with its schema?
#
# Environment: KONG_ADMIN_URL (default http://127.0.0.1:8001), LEDGER_TOKEN (the ledger's gateway
# token; required by `plugins` and `filter-chains`). Needs curl and jq.
#
# Every JSON body is a heredoc between `<<JSON` and `JSON`, one per curl line. A filter config is
# one JSON value, not a Kong record, so every PATCH below sends the complete config rather than
# only the changed key. tests/kong_config.rs extracts each body and checks every filter config in it
# against plugin-schema/prepaid_credits.meta.json and the filter's own parser.
set -euo pipefail

ADMIN=${KONG_ADMIN_URL:-http://127.0.0.1:8001}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CT='Content-Type: application/json'

# Prints the answer; fails on an HTTP error, showing Kong's error body.
call() {
  curl -sS --fail-with-body "$@"
  echo
}

setup() {
  call -X PUT "$ADMIN/services/inference-api" --data url=http://127.0.0.1:8081
  call -X PUT "$ADMIN/routes/chat" --data service.name=inference-api --data 'paths[]=/v1/chat' --data 'methods[]=POST'
  call -X PUT "$ADMIN/routes/embeddings" --data service.name=inference-api --data 'paths[]=/v1/embeddings' --data 'methods[]=POST'
  # key-auth on every metered route: it sets X-Consumer-Username, which the filter reads.
  # No `anonymous` here: anonymous calls would be charged to the anonymous consumer.
  call -X POST "$ADMIN/routes/chat/plugins" --data name=key-auth --data config.hide_credentials=true
  call -X POST "$ADMIN/routes/embeddings/plugins" --data name=key-auth --data config.hide_credentials=true
  # Consumer usernames are the ledger customers' subject keys.
  call -X PUT "$ADMIN/consumers/acme-app"
  call -X POST "$ADMIN/consumers/acme-app/key-auth" --data key=acme-demo-key-change-me
  call -X PUT "$ADMIN/consumers/globex-app"
  call -X POST "$ADMIN/consumers/globex-app/key-auth" --data key=globex-demo-key-change-me
}

plugins() {
  : "${LEDGER_TOKEN:?set LEDGER_TOKEN to the ledger gateway token}"

  # Enable the filter on route `chat`: 0.02 USD a call, credit_only, exact leases.
  CHAT=$(call -X POST "$ADMIN/routes/chat/plugins" -H "$CT" --data @- <<JSON | jq -r .id
{
  "name": "prepaid_credits",
  "config": {
    "ledger": {"upstream": "127.0.0.1:8480", "token": "${LEDGER_TOKEN}", "timeout_ms": 1000},
    "subject": {"header": "x-consumer-username"},
    "price": "0.02",
    "currency": "USD",
    "feature_key": "chat_completions",
    "settlement_mode": "credit_only",
    "sync": {"strategy": "lease", "interval_ms": 1000},
    "lease": {"idle_release_ms": 300000},
    "failure_mode": "deny"
  }
}
JSON
)
  echo "chat: plugin $CHAT"

  # Enable it on route `embeddings`: 0.001 USD a call, credit_then_invoice, cached balance.
  EMB=$(call -X POST "$ADMIN/routes/embeddings/plugins" -H "$CT" --data @- <<JSON | jq -r .id
{
  "name": "prepaid_credits",
  "config": {
    "ledger": {"upstream": "127.0.0.1:8480", "token": "${LEDGER_TOKEN}", "timeout_ms": 1000},
    "subject": {"header": "x-consumer-username"},
    "price": "0.001",
    "currency": "USD",
    "feature_key": "embeddings",
    "settlement_mode": "credit_then_invoice",
    "sync": {"strategy": "cached", "interval_ms": 1000, "max_stale_ms": 60000},
    "failure_mode": "allow",
    "offline_allowance": "0.50",
    "response_headers": {"balance": "x-credits-balance", "cost": null}
  }
}
JSON
)
  echo "embeddings: plugin $EMB"

  # Change the price on `chat` to 0.03 USD: the whole config again, only "price" differs.
  call -X PATCH "$ADMIN/plugins/$CHAT" -H "$CT" --data @- <<JSON
{
  "config": {
    "ledger": {"upstream": "127.0.0.1:8480", "token": "${LEDGER_TOKEN}", "timeout_ms": 1000},
    "subject": {"header": "x-consumer-username"},
    "price": "0.03",
    "currency": "USD",
    "feature_key": "chat_completions",
    "settlement_mode": "credit_only",
    "sync": {"strategy": "lease", "interval_ms": 1000},
    "lease": {"idle_release_ms": 300000},
    "failure_mode": "deny"
  }
}
JSON

  # Disable it on `embeddings` (calls pass unmetered; the config is kept).
  call -X PATCH "$ADMIN/plugins/$EMB" -H "$CT" --data @- <<JSON
{"enabled": false}
JSON

  # Remove it from `chat` altogether.
  call -X DELETE "$ADMIN/plugins/$CHAT"
}

filter_chains() {
  : "${LEDGER_TOKEN:?set LEDGER_TOKEN to the ledger gateway token}"

  # Enable the filter on route `chat` (one chain per route at most).
  CHAT=$(call -X POST "$ADMIN/routes/chat/filter-chains" -H "$CT" --data @- <<JSON | jq -r .id
{
  "name": "chat-credits",
  "filters": [
    {
      "name": "prepaid_credits",
      "config": {
        "ledger": {"upstream": "127.0.0.1:8480", "token": "${LEDGER_TOKEN}", "timeout_ms": 1000},
        "subject": {"header": "x-consumer-username"},
        "price": "0.02",
        "currency": "USD",
        "feature_key": "chat_completions",
        "settlement_mode": "credit_only",
        "sync": {"strategy": "lease", "interval_ms": 1000},
        "lease": {"idle_release_ms": 300000},
        "failure_mode": "deny"
      }
    }
  ]
}
JSON
)
  echo "chat: filter chain $CHAT"

  # Enable it on route `embeddings`.
  EMB=$(call -X POST "$ADMIN/routes/embeddings/filter-chains" -H "$CT" --data @- <<JSON | jq -r .id
{
  "name": "embeddings-credits",
  "filters": [
    {
      "name": "prepaid_credits",
      "config": {
        "ledger": {"upstream": "127.0.0.1:8480", "token": "${LEDGER_TOKEN}", "timeout_ms": 1000},
        "subject": {"header": "x-consumer-username"},
        "price": "0.001",
        "currency": "USD",
        "feature_key": "embeddings",
        "settlement_mode": "credit_then_invoice",
        "sync": {"strategy": "cached", "interval_ms": 1000, "max_stale_ms": 60000},
        "failure_mode": "allow",
        "offline_allowance": "0.50",
        "response_headers": {"balance": "x-credits-balance", "cost": null}
      }
    }
  ]
}
JSON
)
  echo "embeddings: filter chain $EMB"

  # Change the price on `chat` to 0.03 USD: `filters` is replaced whole, so send all of it.
  call -X PATCH "$ADMIN/filter-chains/$CHAT" -H "$CT" --data @- <<JSON
{
  "filters": [
    {
      "name": "prepaid_credits",
      "config": {
        "ledger": {"upstream": "127.0.0.1:8480", "token": "${LEDGER_TOKEN}", "timeout_ms": 1000},
        "subject": {"header": "x-consumer-username"},
        "price": "0.03",
        "currency": "USD",
        "feature_key": "chat_completions",
        "settlement_mode": "credit_only",
        "sync": {"strategy": "lease", "interval_ms": 1000},
        "lease": {"idle_release_ms": 300000},
        "failure_mode": "deny"
      }
    }
  ]
}
JSON

  # Disable the chain on `embeddings` (a single filter can also be switched off with its own
  # "enabled": false inside `filters`).
  call -X PATCH "$ADMIN/filter-chains/$EMB" -H "$CT" --data @- <<JSON
{"enabled": false}
JSON

  # Remove the chain from `chat`.
  call -X DELETE "$ADMIN/filter-chains/$CHAT"
}

dbless() {
  # Kong 3.9+: kong.yaml; Kong 3.5–3.8: kong-3.5-3.8.yaml. Errors come back per entity.
  call -X POST "$ADMIN/config?flatten_errors=1" -F "config=@${1:-$HERE/kong.yaml}"
}

check() {
  call "$ADMIN/schemas/filters/prepaid_credits"   # 404 / error: filter or meta.json not loaded
  call "$ADMIN/routes/chat/filters/enabled"       # filters that run on route chat
}

case "${1:-}" in
  setup) setup ;;
  plugins) plugins ;;
  filter-chains) filter_chains ;;
  dbless) dbless "${2:-}" ;;
  check) check ;;
  *) awk 'NR > 1 && /^set -euo/ { exit } NR > 1' "$0"; exit 2 ;;
esac
