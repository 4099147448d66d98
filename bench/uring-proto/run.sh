#!/usr/bin/env bash
# Side-by-side measurement of the uring-proto FUSE file system over the classic /dev/fuse
# transport and over FUSE-over-io_uring (kmsfs issue 12). Needs root (mount(2), the fuse
# module parameter), fio, and a kernel with CONFIG_FUSE_IO_URING.
#
#   bench/uring-proto/run.sh [ROUNDS]      (default 3; each round runs every config in
#                                           both transports, the order alternating)
#
# Per run: a fresh mount (so the FUSE page cache is empty), then
#   dd if=MNT/file of=/dev/null bs=1M             -> MiB/s, daemon CPU-s per GiB
#   uring-proto statlat MNT/file 100000           -> µs per forced statx (GETATTR round trip),
#                                                    daemon CPU µs, and (with perf) the
#                                                    daemon's syscalls and context switches
#                                                    per statx
#   fio 4 KiB randread --direct=1, psync, QD1, 5 s -> mean completion latency µs
# Configs: mp32 = max_pages 32 (128 KiB requests) with the default readahead; mp256 =
# max_pages 256 (1 MiB requests) with read_ahead_kb 1024 on the mount's bdi (what kmsfs
# mounts with); mp256-aead = mp256 plus an AES-256-GCM-SIV open (aws-lc-rs) of every
# 64 KiB block a READ touches, like kmsfs's cold read path.
# Every kernel setting it changes is restored on exit, also on failure or Ctrl-C; nothing
# stays mounted or running (trap: umount, kill the daemon by PID).
set -euo pipefail
ROUNDS=${1:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HERE/target}
PARAM=/sys/module/fuse/parameters/enable_uring
[ "$(id -u)" = 0 ] || { echo "run.sh: needs root (mount(2) and $PARAM)" >&2; exit 1; }
[ -w "$PARAM" ] || { echo "run.sh: $PARAM missing: the kernel lacks CONFIG_FUSE_IO_URING" >&2; exit 1; }
command -v fio >/dev/null || { echo "run.sh: fio not installed (apt-get install fio)" >&2; exit 1; }

cargo build --release --manifest-path "$HERE/Cargo.toml" >&2
BIN=$CARGO_TARGET_DIR/release/uring-proto

PREV_URING=$(cat "$PARAM")
WORK=$(mktemp -d /tmp/uring-proto.XXXXXX)
MNT=$WORK/mnt
mkdir "$MNT"
DPID=""
cleanup() {
    local rc=$?
    if mountpoint -q "$MNT"; then umount "$MNT" 2>/dev/null || umount -l "$MNT"; fi
    if [ -n "$DPID" ] && kill -0 "$DPID" 2>/dev/null; then kill "$DPID"; wait "$DPID" 2>/dev/null || true; fi
    echo "$PREV_URING" > "$PARAM"
    rm -rf "$WORK"
    echo "run.sh: restored enable_uring=$(cat "$PARAM")" >&2
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
echo Y > "$PARAM"

TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# one_run TRANSPORT MAX_PAGES READAHEAD_KB(or "default") ROUND CONFIG [EXTRA SERVE FLAG]
one_run() {
    local tr=$1 mp=$2 ra=$3 round=$4 cfg=$5 extra=${6:-} log=$WORK/daemon.log
    # shellcheck disable=SC2086
    "$BIN" serve "$MNT" "$tr" --max-pages "$mp" --threads 2 --depth 8 $extra >"$log" 2>&1 &
    DPID=$!
    for _ in $(seq 100); do mountpoint -q "$MNT" && break; sleep 0.05; done
    mountpoint -q "$MNT" || { cat "$log" >&2; echo "run.sh: $tr mount did not appear" >&2; exit 1; }
    local bdi=/sys/class/bdi/$(mountpoint -d "$MNT")/read_ahead_kb
    [ "$ra" = default ] || echo "$ra" > "$bdi"
    local ra_now; ra_now=$(cat "$bdi")
    # correctness: the first 8 MiB equal the generated pattern
    cmp <(dd if="$MNT/file" bs=1M count=8 status=none) <("$BIN" pattern 8) \
        || { echo "run.sh: $tr read wrong bytes" >&2; exit 1; }
    cmp <(dd if="$MNT/file" bs=4k skip=12345 count=3 iflag=direct status=none) \
        <("$BIN" pattern 64 2>/dev/null | dd bs=4k skip=12345 count=3 iflag=fullblock status=none) \
        || { echo "run.sh: $tr O_DIRECT read wrong bytes" >&2; exit 1; }
    umount "$MNT"; wait "$DPID"; DPID=""
    # fresh mount for the throughput run: empty FUSE page cache
    # shellcheck disable=SC2086
    "$BIN" serve "$MNT" "$tr" --max-pages "$mp" --threads 2 --depth 8 $extra >"$log" 2>&1 &
    DPID=$!
    for _ in $(seq 100); do mountpoint -q "$MNT" && break; sleep 0.05; done
    bdi=/sys/class/bdi/$(mountpoint -d "$MNT")/read_ahead_kb
    [ "$ra" = default ] || echo "$ra" > "$bdi"
    local c0 c1 c2 secs mibs cpu lat fiolat
    c0=$(cpu_ticks "$DPID")
    secs=$(dd if="$MNT/file" of=/dev/null bs=1M 2>&1 | awk '/copied/ {for (i=1;i<=NF;i++) if ($i=="s,") print $(i-1)}')
    c1=$(cpu_ticks "$DPID")
    mibs=$(awk -v s="$secs" 'BEGIN {printf "%.0f", 1024 / s}')
    cpu=$(awk -v d=$((c1 - c0)) -v t="$TCK" 'BEGIN {printf "%.2f", d / t}')
    local sys=- cs=-
    if command -v perf >/dev/null; then
        # the daemon's system calls and context switches during the statx loop
        lat=$(perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$DPID" -o "$WORK/perf.csv" \
            -- "$BIN" statlat "$MNT/file" 100000)
        sys=$(awk -F, '$3 ~ /sys_enter/ {printf "%.2f", $1 / 100000}' "$WORK/perf.csv")
        cs=$(awk -F, '$3 ~ /context-switches/ {printf "%.2f", $1 / 100000}' "$WORK/perf.csv")
    else
        lat=$("$BIN" statlat "$MNT/file" 100000)
    fi
    c2=$(cpu_ticks "$DPID")
    local statcpu; statcpu=$(awk -v d=$((c2 - c1)) -v t="$TCK" 'BEGIN {printf "%.2f", d / t * 1e6 / 100000}')
    fiolat=$(fio --name=rr --filename="$MNT/file" --readonly --rw=randread --bs=4k --direct=1 \
        --ioengine=psync --iodepth=1 --runtime=5 --time_based --size=1g --output-format=json \
        | jq -r '.jobs[0].read.clat_ns.mean / 1000 | . * 100 | round / 100')
    umount "$MNT"; wait "$DPID"; DPID=""
    local dev ring
    dev=$(sed -n 's/.* \([0-9]*\) requests over \/dev\/fuse.*/\1/p' "$log")
    ring=$(sed -n 's/.*, \([0-9]*\) over io_uring.*/\1/p' "$log")
    if [ "$tr" = uring ] && [ "${ring:-0}" -eq 0 ]; then
        cat "$log" >&2; echo "run.sh: io_uring run served nothing over the ring" >&2; exit 1
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$cfg" "$ra_now" "$tr" \
        "$mibs" "$cpu" "$lat" "$statcpu" "$fiolat" "$dev" "$ring" "$sys" "$cs"
}

CONFIGS=${CONFIGS:-mp32 mp256 mp256-aead}
echo "# $(date -u +%FT%TZ) kernel $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
OUT=$WORK/results.tsv
printf 'round\tconfig\tra_kb\ttransport\tMiB/s\tdaemonCPU-s/GiB\tstatx_us\tdaemonCPU_us/statx\tfio4k_us\tdev_reqs\tring_reqs\tdaemon_syscalls/statx\tdaemon_ctxsw/statx\n' | tee "$OUT"
for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="classic uring"; else order="uring classic"; fi
    for cfg in $CONFIGS; do
        case $cfg in
            mp32) set -- 32 default "" ;;
            mp256) set -- 256 1024 "" ;;
            mp256-aead) set -- 256 1024 --aead ;;
        esac
        # not in a pipeline: one_run must run in this shell so the trap sees DPID
        for tr in $order; do one_run "$tr" "$1" "$2" "$r" "$cfg" "$3" >>"$OUT"; tail -n 1 "$OUT"; done
    done
done
echo
echo "# load at the end $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "median (min-max) over $ROUNDS rounds:"
printf '%-11s %-8s %-18s %-18s %-18s %-18s %-18s %-18s %-18s\n' config transport MiB/s CPU-s/GiB \
    statx_us CPU_us/statx fio4k_us syscalls/statx ctxsw/statx
for cfg in $CONFIGS; do for tr in classic uring; do
    awk -F'\t' -v c="$cfg" -v t="$tr" 'NR > 1 && $2 == c && $4 == t' "$OUT" | python3 -c '
import sys, statistics as s
rows = [l.split("\t") for l in sys.stdin if l.strip()]
cells = []
for i in [4, 5, 6, 7, 8, 11, 12]:
    v = [float(r[i]) for r in rows if r[i].strip() not in ("", "-")] or [float("nan")]
    cells.append(f"{s.median(v):g} ({min(v):g}-{max(v):g})")
print(f"{sys.argv[1]:<11} {sys.argv[2]:<8} " + " ".join(f"{c:<18}" for c in cells))' "$cfg" "$tr"
done; done
