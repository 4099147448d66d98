#!/usr/bin/env bash
# Engine-level benchmark (no FUSE): sequential write/read, cache hits and 4 KiB
# random I/O of the volume core for each block size (4K..1M), to choose the
# default block size by measurement. Then the raw AEAD ceiling (criterion).
# Writes bench/results/engine-latest.md. Environment: see examples/engine_bench.rs
# (KMSFS_BENCH_SIZE=1G, KMSFS_BENCH_BLOCK_SIZES, KMSFS_BENCH_RANDOM_SECS, ...);
# BENCH_NO_AEAD=1 skips the criterion part.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../scripts/lib.sh"
cd "$KMSFS_ROOT"
need_cargo
exec </dev/null
mkdir -p bench/results
out="bench/results/engine-latest.md"
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
{
    echo "# kmsfs engine benchmark"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git_commit), $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo))."
    echo
} >"$tmp"
log "cargo run --release --example engine_bench"
cargo run --release --quiet --example engine_bench | tee -a "$tmp"
if [ -z "${BENCH_NO_AEAD:-}" ]; then
    log "cargo bench --bench aead"
    {
        echo
        echo "## Raw AEAD throughput (criterion, one thread)"
        echo
        echo "| operation | cipher | size | throughput (median) |"
        echo "|---|---|---|---:|"
    } >>"$tmp"
    cargo bench --bench aead 2>/dev/null | awk '
        /^(seal|open)\// { split($1, p, "/"); name = "| " p[1] " | " p[2] " | " p[3] " | " }
        /thrpt:/ && name != "" { print name $4 " " $5 " |"; name = "" }' | tee -a "$tmp"
fi
cat "$tmp" >"$out"
log "written to $out"
