#!/usr/bin/env bash
# What one request costs the server: the MLP (784-128-10, a JSON body of 784 floats) at batch
# size 8 (5 ms delay), `wrk -t1 -c64` over loopback, and the server's CPU time read from /proc
# around each run. Several builds are alternated round by round, each started afresh, so that
# their ratios come from one sitting on this shared machine.
# Prints a JSON line per run: requests/s, p99, server cores and requests per server-CPU-second.
# Usage: bench/per_request.sh [BIN ...]   (default: target/release/tchserve)
#   ROUNDS (default 3) rounds, SECS (default 8) seconds per run after 2 s of warm-up.
# To compare with an older commit, build it in a worktree and pass both binaries.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${ROUNDS:-3}
secs=${SECS:-8}
out=$root/build/bench
work=$out/per_request
bins=()
for b in "${@:-$root/target/release/tchserve}"; do bins+=("$(realpath "$b")"); done

command -v wrk >/dev/null || { apt-get install -y -q wrk >/dev/null; }
cargo build --release -p tchserve-cli --bins >/dev/null 2>&1
[ -f "$out/mlp.json" ] || .venv/bin/python bench/make_models.py "$out"
rm -rf "$work"; mkdir -p "$work/store" "$work/logs"
target/release/tch-model-archiver --model-name mlp --version 1.0 --serialized-file "$out/mlp.pt" \
    --handler bench/mlp_handler.json --export-path "$work/store" --force
cat > "$work/config.properties" <<CFG
inference_address=http://127.0.0.1:8080
management_address=http://127.0.0.1:8081
metrics_address=http://127.0.0.1:8082
model_store=$work/store
enable_model_api=true
disable_token_authorization=true
CFG
echo "{\"machine\": \"$(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores\", \"seconds_per_run\": $secs, \"date\": \"$(date -u +%FT%TZ)\"}"
tck=$(getconf CLK_TCK)
# CPU ticks of the server and its threads (utime + stime of the process).
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

cd "$work"
for round in $(seq "$rounds"); do
    for bin in "${bins[@]}"; do
        "$bin" --foreground --ncs --log-dir "$work/logs" >"$work/server.log" 2>&1 &
        pid=$!
        for _ in $(seq 100); do
            curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:8080/ping 2>/dev/null | grep -q 200 && break
            kill -0 $pid 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
            sleep 0.2
        done
        code=$(curl -s -o /dev/null -w '%{http_code}' -X POST \
            "127.0.0.1:8081/models?url=mlp.mar&model_name=mlp_b8&initial_workers=1&batch_size=8&max_batch_delay=5&synchronous=true")
        [ "$code" = 200 ] || { echo "registration answered $code" >&2; kill $pid; exit 1; }
        BODY=$out/mlp.json wrk -t1 -c64 -d2s -s "$root/bench/wrk_post.lua" http://127.0.0.1:8080/predictions/mlp_b8 >/dev/null
        before=$(ticks $pid)
        report=$(BODY=$out/mlp.json wrk -t1 -c64 -d"${secs}s" --latency -s "$root/bench/wrk_post.lua" http://127.0.0.1:8080/predictions/mlp_b8)
        after=$(ticks $pid)
        kill $pid; wait $pid || true
        echo "$report" | awk -v round="$round" -v bin="$bin" -v secs="$secs" -v tck="$tck" \
            -v used="$((after - before))" '
            /Requests\/sec/ { rps = $2 }
            $1 == "99%" { p99 = $2 }
            /Non-2xx/ { bad = $NF }
            END {
                cores = used / tck / secs
                printf "{\"round\": %d, \"bin\": \"%s\", \"req_per_s\": %.0f, \"p99\": \"%s\", \"server_cores\": %.2f, \"req_per_server_cpu_s\": %.0f, \"non_2xx\": %d}\n",
                    round, bin, rps, p99, cores, rps * secs * tck / used, bad
            }'
    done
done
