#!/usr/bin/env bash
# A screenshot of a run's curves in TensorBoard, taken with Debian's headless Chromium (apt-get install chromium).
# docs/tensorboard-demo.png was taken after `make demo` with:
#   TAG_FILTER='train/(loss|lr|grad_norm|real_tokens_per_s|host_rss_gib)$|eval/(log_loss|accuracy|ece)' \
#       docs/tensorboard_screenshot.sh runs/demo/tracking/tensorboard docs/tensorboard-demo.png
# TensorBoard runs on 127.0.0.1 (port $PORT, default 6123) for as long as the screenshot takes.
set -euo pipefail
logdir=$1 out=$2 port=${PORT:-6123}
root=$(cd "$(dirname "$0")/.." && pwd)
log=$(mktemp) runs=$(mktemp -d)
cp -r "$logdir" "$runs/${RUN_NAME:-demo}"  # TensorBoard names a run by its folder
"$root/.venv/bin/tensorboard" --logdir "$runs" --host 127.0.0.1 --port "$port" >"$log" 2>&1 & tensorboard=$!
trap 'kill $tensorboard 2>/dev/null; rm -rf "$log" "$runs"' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/data/plugin/scalars/tags" | grep -q "loss" && break  # the events are read
    kill -0 $tensorboard 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.5
done
# The time-series dashboard, filtered to the training loss, learning rate, gradient norm, throughput and step time
# and the validation log loss (TensorBoard reads `tagFilter` from the query); its scripts load and
# draw within the virtual time budget before the page is captured; forceSVG draws the charts without WebGL,
# which a headless browser without a GPU lacks.
filter=${TAG_FILTER:-train/(loss|lr|grad_norm|real_tokens_per_s|step_time_s)$|eval/log_loss}
query=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$filter")
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1750 \
    --virtual-time-budget=90000 --screenshot="$out" "http://127.0.0.1:$port/?forceSVG=true&tagFilter=$query&smoothing=0#timeseries"
echo "wrote $out"
