#!/bin/bash
# N browser workers in one headless-Chromium tab vs N native threads, RW-256 low-rank.
# Usage: xtask/scripts/tab-throughput.sh N SECONDS (needs target/release/seedling, www/pkg,
# /usr/bin/chromium and /usr/bin/chromedriver). Drives the real page over the WebDriver
# protocol with curl, reads members evaluated from /api/status. Not part of CI.
set -u
cd "$(dirname "$0")/../.."
N=${1:-2}; SECS=${2:-60}
P=8711; D=9515
ARGS="--port $P --hidden 256 --layers 2 --population 256 --batch 16 --seq-len 64 --eval-every 0 --checkpoint-every 0 --replicate 0 --job-timeout 120 --step-timeout 600"
members() { curl -s localhost:$P/api/status | python3 -c "import json,sys; s=json.load(sys.stdin); print(sum(c['members'] for c in s['client_hashes'].values()), s['step'])"; }
./target/release/seedling serve $ARGS > /tmp/tab_serve.log 2>&1 & SP=$!
sleep 3
/usr/bin/chromedriver --port=$D > /dev/null 2>&1 & CP=$!
sleep 1
SID=$(curl -s -X POST localhost:$D/session -d '{"capabilities":{"alwaysMatch":{"goog:chromeOptions":{"binary":"/usr/bin/chromium","args":["--headless","--no-sandbox","--disable-gpu","--disable-dev-shm-usage","--disable-background-networking","--disable-component-update","--disable-sync","--no-first-run"]}}}}' | python3 -c "import json,sys; print(json.load(sys.stdin)['value']['sessionId'])")
curl -s -X POST localhost:$D/session/$SID/url -d "{\"url\":\"http://127.0.0.1:$P/\"}" > /dev/null
sleep 2
el() { curl -s -X POST localhost:$D/session/$SID/element -d "{\"using\":\"css selector\",\"value\":\"$1\"}" | python3 -c "import json,sys; v=json.load(sys.stdin)['value']; print(list(v.values())[0])"; }
click() { curl -s -X POST localhost:$D/session/$SID/element/$(el "$1")/click -d '{}' > /dev/null; }
for i in $(seq 2 $N); do click '#workers-plus'; done
click '#contribute'
sleep 20   # warm-up: join, snapshot, first jobs
read m0 s0 < <(members); t0=$(date +%s.%N)
sleep $SECS
read m1 s1 < <(members); t1=$(date +%s.%N)
echo "browser tab, $N workers: $(python3 -c "print(round(($m1-$m0)/($t1-$t0),2))") members/s over steps $s0..$s1"
curl -s -X DELETE localhost:$D/session/$SID > /dev/null; kill $CP; sleep 3
./target/release/seedling worker --server ws://127.0.0.1:$P/ws --threads $N > /dev/null 2>&1 & WP=$!
sleep 20
read m0 s0 < <(members); t0=$(date +%s.%N)
sleep $SECS
read m1 s1 < <(members); t1=$(date +%s.%N)
echo "native worker, $N threads: $(python3 -c "print(round(($m1-$m0)/($t1-$t0),2))") members/s over steps $s0..$s1"
kill $WP $SP
