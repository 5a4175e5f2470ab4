#!/usr/bin/env bash
# `make demo`: the whole system on this machine, then one payment walked through it the way a mini-program would.
#   1. private NATS and PostgreSQL (scripts/infra.sh up)
#   2. the WeChat sandbox on a free port, with a development identity under .run/wechat
#   3. `paystream all` (ingress, processors, relay, notifier) configured by the sandbox's paystream.toml
#   4. `paystream demo`: log in, book, prepay, the sandbox pays, poll until paid; prints every step and its time
# Everything started here is stopped on exit. Exit status is the demo's.
# `scripts/demo.sh bench [--users N --concurrency C]` runs `paystream bench pipeline` instead of the demo walk.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
run="$root/.run"
bin="${PAYSTREAM_BIN:-${CARGO_TARGET_DIR:-$root/target}/debug/paystream}"
cd "$root"

scripts/infra.sh up >/dev/null
set -a; source "$run/infra.env"; set +a

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(free_port)
admin_port=$(free_port)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

callback="http://127.0.0.1:$http_port/payment/v1/thirdPayment/thirdPaymentWxPayCallback"
"$bin" sandbox init --dir "$run/wechat" --notify-url "$callback" --force >/dev/null 2>>"$run/sandbox.log"
mkfifo "$run/sandbox.out.$$"
"$bin" sandbox --dir "$run/wechat" --listen 127.0.0.1:0 --time-scale 100 >"$run/sandbox.out.$$" 2>"$run/sandbox.log" &
pids+=($!)
read -r first <"$run/sandbox.out.$$"
rm -f "$run/sandbox.out.$$"
sandbox_url=${first##* }
echo "sandbox (WeChat) on $sandbox_url"

# The demo user's openid (the sandbox derives it from the part of the login code before ':'), so that the notifier
# can run as in development: `developer` state, messages only to allow-listed openids.
openid=$(curl -fsS "$sandbox_url/sns/jscode2session?appid=$(cat "$run/wechat/appid")&secret=$(cat "$run/wechat/miniprogram_secret")&js_code=demo:$RANDOM$RANDOM&grant_type=authorization_code" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["openid"])')
config="$run/paystream.toml"
cat "$run/wechat/paystream.toml" - >"$config" <<TOML

[notifier]
miniprogram_state = "developer"
allow_openids = ["$openid"]

[notifier.templates.pay_success]
template_id = "TPL_PAY_SUCCESS"
page = "pages/order/detail?sn={order_sn}"
fields = { character_string6 = "order_sn", thing1 = "title", amount2 = "amount", time4 = "live_start", time5 = "live_end" }

[notifier.templates.checkin_notice]
template_id = "TPL_CHECKIN"
page = "pages/order/detail?sn={order_sn}"
fields = { thing1 = "title", date2 = "live_period", character_string3 = "trade_code", number4 = "live_people_num" }

[notifier.templates.refund_success]
template_id = "TPL_REFUND"
page = "pages/order/detail?sn={order_sn}"
fields = { character_string1 = "order_sn", thing2 = "title", amount3 = "amount" }
TOML
chmod 600 "$config"

export PAYSTREAM__HTTP__LISTEN="127.0.0.1:$http_port"
export PAYSTREAM__ADMIN__LISTEN="127.0.0.1:$admin_port"
export PAYSTREAM__HTTP__JWT_SECRET="${PAYSTREAM__HTTP__JWT_SECRET:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}"
export PAYSTREAM__TELEMETRY__LOG_FILTER="${PAYSTREAM__TELEMETRY__LOG_FILTER:-warn}"
# The demo books one of the demo homestays, which the ingress inserts only when asked.
export PAYSTREAM__HTTP__SEED_DEMO_HOMESTAYS=true
"$bin" --config "$config" all >"$run/all.out" 2>"$run/all.log" &
pids+=($!)
deadline=$((SECONDS + 60))
until curl -fsS "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1; do
  if ((SECONDS > deadline)) || ! kill -0 "${pids[-1]}" 2>/dev/null; then
    echo "paystream all did not become ready; its log:" >&2; tail -20 "$run/all.log" >&2; exit 1
  fi
  sleep 0.2
done
echo "paystream all ready: API on http://127.0.0.1:$http_port, admin on http://127.0.0.1:$admin_port"

if [[ ${1:-} == bench ]]; then
  shift
  "$bin" --config "$config" bench pipeline --api "http://127.0.0.1:$http_port" --sandbox "$sandbox_url" "$@"
else
  "$bin" --config "$config" demo --api "http://127.0.0.1:$http_port" --sandbox "$sandbox_url"
fi
