#!/usr/bin/env bash
# Side-by-side benchmark: the same workloads, in one run, on the same disk, on
#   plain      a plain directory (the ceiling),
#   kmsfs      this project (target/release/kmsfs, built here),
#   gocryptfs  the closest peer (Debian package),
#   cryfs, securefs  optional columns, when their Debian packages install.
# Workloads (each on a fresh volume per run; medians over BENCH_RUNS runs):
#   write   1 GiB of random data, dd bs=1M conv=fsync                 (MB/s)
#   read    the same file after unmount, cache drop and remount        (MB/s)
#   untar   a tar of 5000 files in 200 dirs (generated), then flush    (s)
#           (flush: sync for plain; unmount until the daemon exits for FUSE)
#   ls -lR  of that tree after cache drop and remount                  (s)
#   rm -rf  of that tree                                               (s)
#   fio     4 KiB random write (psync, buffered, end fsync), then
#           random read after cache drop and remount, 256 MiB file     (IOPS)
# Prints a table with absolute figures and kmsfs/gocryptfs, kmsfs/plain ratios,
# and writes it to bench/results/latest.md. Performance is reported, never judged.
#
# Usage: bench/run.sh            (as root; about 15 minutes)
#        BENCH_QUICK=1 bench/run.sh   (256 MiB, 1 run, short fio: a few minutes)
# Environment:
#   BENCH_RUNS=3         runs per file system (median reported)
#   BENCH_SIZE_MB=1024   streaming file size
#   BENCH_FILES=5000     files in the generated tree (in BENCH_DIRS=200 dirs)
#   BENCH_FIO_MB=256     fio file size;  BENCH_FIO_SECS=10  per fio phase
#   BENCH_FS="plain kmsfs gocryptfs cryfs securefs"   columns to measure
#   BENCH_DIR=/var/tmp   where the scratch directory goes (same disk for all)
#   BENCH_NO_INSTALL=1   do not apt-get anything;  BENCH_KEEP=1  keep scratch
#   KMSFS_BIN=path       use this kmsfs binary instead of building one
set -euo pipefail
export LC_ALL=C
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../scripts/lib.sh"
cd "$KMSFS_ROOT"

if [ -n "${BENCH_QUICK:-}" ]; then
    : "${BENCH_RUNS:=1}" "${BENCH_SIZE_MB:=256}" "${BENCH_FIO_SECS:=5}" "${BENCH_FIO_MB:=128}"
fi
RUNS="${BENCH_RUNS:-3}"
SIZE_MB="${BENCH_SIZE_MB:-1024}"
NFILES="${BENCH_FILES:-5000}"
NDIRS="${BENCH_DIRS:-200}"
FIO_MB="${BENCH_FIO_MB:-256}"
FIO_SECS="${BENCH_FIO_SECS:-10}"
WANT_FS="${BENCH_FS:-plain kmsfs gocryptfs cryfs securefs}"
RESULTS="$KMSFS_ROOT/bench/results"

[ "$(id -u)" -eq 0 ] || die "run as root (FUSE mounts, dropping the page cache)"
exec </dev/null

# ---------------------------------------------------------------- install, build
if [ -z "${BENCH_NO_INSTALL:-}" ]; then
    apt_install fuse3 fio gocryptfs tar coreutils
    for fs in cryfs securefs; do
        case " $WANT_FS " in *" $fs "*) apt_install_optional "$fs" ;; esac
    done
fi
need_fuse
command -v fio >/dev/null || die "fio is missing"

KMSFS="${KMSFS_BIN:-$KMSFS_ROOT/target/release/kmsfs}"
if [ -z "${KMSFS_BIN:-}" ] && [[ " $WANT_FS " == *" kmsfs "* ]]; then
    need_cargo
    log "building kmsfs (release)"
    cargo build --release --bins || log "warning: the kmsfs build failed; its column will be empty"
fi

FS_LIST=()
for fs in $WANT_FS; do
    case "$fs" in
        plain) FS_LIST+=(plain) ;;
        kmsfs)
            if [ -x "$KMSFS" ] && "$KMSFS" --help 2>&1 | grep -qw mount && "$KMSFS" mount --help >/dev/null 2>&1; then
                FS_LIST+=(kmsfs)
            else
                log "warning: $KMSFS has no working init/mount command; kmsfs skipped"
            fi
            ;;
        gocryptfs | cryfs | securefs)
            if command -v "$fs" >/dev/null 2>&1; then FS_LIST+=("$fs"); else log "$fs not installed; skipped"; fi
            ;;
        *) die "unknown file system in BENCH_FS: $fs" ;;
    esac
done
[ "${#FS_LIST[@]}" -gt 0 ] || die "nothing to measure"

# ---------------------------------------------------------------- scratch, cleanup
mkdir -p "${BENCH_DIR:-/var/tmp}"
BASE="$(mktemp -d "${BENCH_DIR:-/var/tmp}/kmsfs-bench.XXXXXX")"
DATA="$BASE/data"
MOUNTS=()
cleanup() {
    local rc=$? m
    trap - EXIT INT TERM
    for m in "${MOUNTS[@]}"; do
        unmount_wait "$m" 30 || true
    done
    if [ -n "${BENCH_KEEP:-}" ]; then
        log "scratch kept in $BASE"
    else
        rm -rf "$BASE"
    fi
    exit "$rc"
}
trap cleanup EXIT INT TERM

CAN_DROP=1
drop_caches() {
    sync
    if [ "$CAN_DROP" = 1 ]; then
        echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || {
            CAN_DROP=0
            log "warning: cannot drop the page cache; cold reads are not cold"
        }
    fi
}

# ---------------------------------------------------------------- data
mkdir -p "$DATA"
log "generating $SIZE_MB MiB of random data and a $NFILES-file tree"
dd if=/dev/urandom of="$DATA/random.bin" bs=1M count="$SIZE_MB" status=none
# A deterministic source-like tree: sizes mostly 0.1-4 KiB, some to 32 KiB, a few
# to 256 KiB; contents from a fixed xorshift stream (not compressible).
perl -e '
    use strict; use warnings; no warnings "portable";
    my ($root, $nfiles, $ndirs) = @ARGV;
    my $x = 0x2545F4914F6CDD1D;
    sub rnd { $x ^= ($x << 13) & 0xFFFFFFFFFFFFFFFF; $x ^= $x >> 7;
              $x ^= ($x << 17) & 0xFFFFFFFFFFFFFFFF; return $x; }
    my $pool = pack("Q*", map { rnd() } 1 .. 65536);   # 512 KiB
    my $top = int(sqrt($ndirs)) || 1;
    for my $i (0 .. $nfiles - 1) {
        my $d = $i % $ndirs;
        my $dir = sprintf("%s/tree/d%02d/s%03d", $root, $d % $top, $d);
        unless (-d $dir) { system("mkdir", "-p", $dir) == 0 or die "mkdir $dir" }
        my $r = rnd() % 100;
        my $size = $r < 60 ? 100 + rnd() % 4000
                 : $r < 95 ? 4096 + rnd() % 28672
                 :           32768 + rnd() % 229376;
        my $off = rnd() % (length($pool) - $size);
        my $ext = (".c", ".h", ".rs", ".txt", ".md", "")[$i % 6];
        open(my $f, ">", sprintf("%s/file%05d%s", $dir, $i, $ext)) or die;
        binmode $f; print $f substr($pool, $off, $size); close $f;
    }
' "$DATA" "$NFILES" "$NDIRS"
tar -C "$DATA" -cf "$DATA/src.tar" tree
TREE_MB="$(du -sm "$DATA/tree" | cut -f1)"
rm -rf "$DATA/tree"

PASS="$BASE/passphrase"
head -c 24 /dev/urandom | base64 >"$PASS"
chmod 600 "$PASS"

# ---------------------------------------------------------------- per-fs mount
# fs_create FS DIR: a fresh, empty volume in DIR/backing (mount point DIR/mnt).
fs_create() {
    local fs="$1" d="$2"
    mkdir -p "$d/backing" "$d/mnt" || return 1
    case "$fs" in
        plain) ;;
        kmsfs) KMSFS_KEYSTORE="$d/keystore" KMSFS_PASSPHRASE_FILE="$PASS" \
            "$KMSFS" init "$d/backing" >"$d/init.log" 2>&1 ;;
        gocryptfs) gocryptfs -init -q -passfile "$PASS" -scryptn 10 "$d/backing" >"$d/init.log" 2>&1 ;;
        cryfs) ;; # created on first mount
        securefs) securefs create --pass "$(cat "$PASS")" "$d/backing" >"$d/init.log" 2>&1 ;;
    esac
}

fs_mount() {
    local fs="$1" d="$2" i
    case "$fs" in
        plain) return 0 ;;
        kmsfs) KMSFS_KEYSTORE="$d/keystore" KMSFS_PASSPHRASE_FILE="$PASS" \
            "$KMSFS" mount "$d/backing" "$d/mnt" >>"$d/mount.log" 2>&1 || return 1 ;;
        gocryptfs) gocryptfs -q -passfile "$PASS" "$d/backing" "$d/mnt" >>"$d/mount.log" 2>&1 || return 1 ;;
        cryfs) mkdir -p "$d/home" && HOME="$d/home" CRYFS_FRONTEND=noninteractive CRYFS_NO_UPDATE_CHECK=true \
            cryfs "$d/backing" "$d/mnt" <"$PASS" >>"$d/mount.log" 2>&1 || return 1 ;;
        securefs) securefs mount -b --pass "$(cat "$PASS")" --log "$d/securefs.log" \
            "$d/backing" "$d/mnt" >>"$d/mount.log" 2>&1 || return 1 ;;
    esac
    case " ${MOUNTS[*]} " in *" $d/mnt "*) ;; *) MOUNTS+=("$d/mnt") ;; esac
    for ((i = 0; i < 300; i++)); do
        mountpoint -q "$d/mnt" && return 0
        sleep 0.1
    done
    log "$fs: $d/mnt did not become a mount point"
    return 1
}

# fs_unmount FS DIR: unmounts and waits until the daemon has flushed and exited.
fs_unmount() {
    local fs="$1" d="$2"
    [ "$fs" = plain ] && { sync; return 0; }
    unmount_wait "$d/mnt" 300
}

# Cold cache: plain drops the page cache; FUSE file systems are also remounted.
fs_cold() {
    fs_unmount "$1" "$2" || return 1
    drop_caches
    fs_mount "$1" "$2"
}

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", b - a }'; }

declare -A RES=()
add() { RES["$1,$2"]="${RES["$1,$2"]:-} $3"; }

# fs_round FS RUN: all workloads on a fresh volume. Every step is checked
# explicitly (set -e does not apply inside a function called from `if`).
fs_round() {
    local fs="$1" run="$2" d="$BASE/$1-$2" m t0 t1 out
    m="$d/mnt"
    fs_create "$fs" "$d" || { log "$fs: create failed: $(cat "$d/init.log" 2>/dev/null)"; return 1; }
    fs_mount "$fs" "$d" || { log "$fs: mount failed: $(cat "$d/mount.log" 2>/dev/null)"; return 1; }

    # (a) streaming write with fsync, from a warm source file.
    cat "$DATA/random.bin" >/dev/null
    t0=$(now)
    dd if="$DATA/random.bin" of="$m/big" bs=1M count="$SIZE_MB" conv=fsync status=none || return 1
    t1=$(now)
    add "$fs" write "$(awk -v s="$(elapsed "$t0" "$t1")" -v n="$SIZE_MB" 'BEGIN { printf "%.1f", n * 1.048576 / s }')"
    # (a') read back, cold.
    fs_cold "$fs" "$d" || return 1
    t0=$(now)
    dd if="$m/big" of=/dev/null bs=1M status=none || return 1
    t1=$(now)
    add "$fs" read "$(awk -v s="$(elapsed "$t0" "$t1")" -v n="$SIZE_MB" 'BEGIN { printf "%.1f", n * 1.048576 / s }')"
    if [ "$run" = 1 ]; then
        cmp -s "$DATA/random.bin" "$m/big" || { log "$fs: the 1 GiB file reads back WRONG"; return 1; }
    fi
    rm -f "$m/big" || return 1

    # (b) untar, then flush.
    cat "$DATA/src.tar" >/dev/null
    t0=$(now)
    tar -C "$m" -xf "$DATA/src.tar" || return 1
    fs_unmount "$fs" "$d" || return 1
    t1=$(now)
    add "$fs" untar "$(elapsed "$t0" "$t1")"
    drop_caches
    fs_mount "$fs" "$d" || return 1
    out="$(find "$m/tree" -type f | wc -l)"
    [ "$out" -eq "$NFILES" ] || { log "$fs: $out files after untar, expected $NFILES"; return 1; }

    # (c) ls -lR, cold.
    fs_cold "$fs" "$d" || return 1
    t0=$(now)
    ls -lR "$m/tree" >/dev/null || return 1
    t1=$(now)
    add "$fs" ls "$(elapsed "$t0" "$t1")"

    # (d) rm -rf.
    t0=$(now)
    rm -rf "$m/tree" || return 1
    t1=$(now)
    add "$fs" rm "$(elapsed "$t0" "$t1")"

    # (e) fio 4 KiB random write, then random read (cold).
    local fio_args=(--filename="$m/fio.dat" --size="${FIO_MB}M" --bs=4k --ioengine=psync --direct=0
        --runtime="$FIO_SECS" --time_based --minimal)
    out="$(fio --name=randwrite --rw=randwrite --end_fsync=1 "${fio_args[@]}" 2>>"$d/fio.log")" || return 1
    add "$fs" randwrite "$(cut -d';' -f49 <<<"$out")"
    fs_cold "$fs" "$d" || return 1
    out="$(fio --name=randread --rw=randread "${fio_args[@]}" 2>>"$d/fio.log")" || return 1
    add "$fs" randread "$(cut -d';' -f8 <<<"$out")"

    fs_unmount "$fs" "$d" || return 1
    rm -rf "$d"
}

# ---------------------------------------------------------------- run
declare -A FAILED=()
START=$(now)
for ((run = 1; run <= RUNS; run++)); do
    for fs in "${FS_LIST[@]}"; do
        [ -n "${FAILED[$fs]:-}" ] && continue
        log "run $run/$RUNS: $fs"
        if ! fs_round "$fs" "$run"; then
            log "$fs: FAILED in run $run; its column is left out"
            FAILED[$fs]=1
            fs_unmount "$fs" "$BASE/$fs-$run" || true
        fi
    done
done
TOTAL="$(elapsed "$START" "$(now)")"

# ---------------------------------------------------------------- report
median() {
    tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print ""; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
med() { # med FS METRIC -> median or empty
    [ -n "${FAILED[$1]:-}" ] && return 0
    median <<<"${RES["$1,$2"]:-}"
}
fmt() { # fmt VALUE DIGITS
    [ -z "$1" ] && { echo "n/a"; return; }
    awk -v v="$1" -v d="$2" 'BEGIN { printf "%.*f", d, v }'
}
ratio() {
    if [ -z "$1" ] || [ -z "$2" ]; then echo "n/a"; return; fi
    awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'
}

COLS=(plain kmsfs gocryptfs cryfs securefs)
SHOWN=()
for fs in "${COLS[@]}"; do
    case " ${FS_LIST[*]} " in *" $fs "*) SHOWN+=("$fs") ;; esac
done

METRICS=(write read untar ls rm randwrite randread)
declare -A LABEL=([write]="1 GiB write + fsync" [read]="1 GiB read (cold)" [untar]="untar $NFILES files + flush"
    [ls]="ls -lR (cold)" [rm]="rm -rf" [randwrite]="fio 4K random write" [randread]="fio 4K random read (cold)")
declare -A UNIT=([write]="MB/s" [read]="MB/s" [untar]="s" [ls]="s" [rm]="s" [randwrite]="IOPS" [randread]="IOPS")
declare -A BETTER=([write]=higher [read]=higher [untar]=lower [ls]=lower [rm]=lower [randwrite]=higher [randread]=higher)
declare -A DIGITS=([write]=0 [read]=0 [untar]=2 [ls]=2 [rm]=2 [randwrite]=0 [randread]=0)
[ "$SIZE_MB" = 1024 ] || { LABEL[write]="$SIZE_MB MiB write + fsync"; LABEL[read]="$SIZE_MB MiB read (cold)"; }

cpu="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
commit="$(git_commit)"
versions=""
declare -A NOTE=([plain]="" [kmsfs]="aes-256-gcm-siv, default block size" [gocryptfs]="AES-256-GCM"
    [cryfs]="xchacha20-poly1305, 16 KiB blocks" [securefs]="format 4")
for fs in "${SHOWN[@]}"; do
    case "$fs" in
        plain) v="plain directory ($(df --output=fstype "$BASE" | tail -1))" ;;
        kmsfs) v="kmsfs $("$KMSFS" --version 2>/dev/null | awk '{ print $NF }' || true)" ;;
        gocryptfs) v="$(gocryptfs -version 2>/dev/null | head -1 | cut -d';' -f1 || true)" ;;
        cryfs) v="$(cryfs --version 2>/dev/null | head -1 | sed 's/ Version//' || true)" ;;
        securefs) v="securefs $(dpkg-query -W -f='${Version}' securefs 2>/dev/null || true)" ;;
    esac
    [ -n "${NOTE[$fs]}" ] && v="$v (${NOTE[$fs]})"
    versions="${versions:+$versions; }$v"
done

{
    echo "# kmsfs side-by-side benchmark"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit, $(uname -r), $(nproc) cores ($cpu), $(free -g | awk '/^Mem:/ { print $2 }') GiB RAM."
    echo "All file systems on the same disk ($(df --output=source "$BASE" | tail -1), under ${BENCH_DIR:-/var/tmp})."
    echo "Median of $RUNS run(s); each run on a fresh volume; total time ${TOTAL%.*} s."
    echo "Streaming: $SIZE_MB MiB of random data. Tree: $NFILES files in $NDIRS dirs, $TREE_MB MiB."
    echo "fio: 4 KiB blocks, psync, buffered (--direct=0), ${FIO_MB} MiB file, $FIO_SECS s per phase."
    [ "$CAN_DROP" = 1 ] || echo "WARNING: the page cache could not be dropped; 'cold' figures are warm."
    echo "Measured: $versions; $(fio --version)."
    echo
    printf '| workload | unit | better |'
    for fs in "${SHOWN[@]}"; do printf ' %s |' "$fs"; done
    printf ' kmsfs/gocryptfs | kmsfs/plain |\n'
    printf '|---|---|---|'
    for _ in "${SHOWN[@]}"; do printf -- '---:|'; done
    printf -- '---:|---:|\n'
    for mt in "${METRICS[@]}"; do
        printf '| %s | %s | %s |' "${LABEL[$mt]}" "${UNIT[$mt]}" "${BETTER[$mt]}"
        for fs in "${SHOWN[@]}"; do printf ' %s |' "$(fmt "$(med "$fs" "$mt")" "${DIGITS[$mt]}")"; done
        printf ' %s | %s |\n' "$(ratio "$(med kmsfs "$mt")" "$(med gocryptfs "$mt")")" \
            "$(ratio "$(med kmsfs "$mt")" "$(med plain "$mt")")"
    done
    echo
    echo "Ratios divide kmsfs's figure by the peer's: for MB/s and IOPS above 1 means kmsfs is faster,"
    echo "for seconds below 1 means kmsfs is faster."
    for fs in "${!FAILED[@]}"; do echo "$fs: failed during the run (see the log above); its column shows n/a."; done
    if [ "$RUNS" -gt 1 ]; then
        echo
        echo "<details><summary>All runs</summary>"
        echo
        for mt in "${METRICS[@]}"; do
            for fs in "${SHOWN[@]}"; do echo "- $mt $fs:${RES["$fs,$mt"]:-}"; done
        done
        echo
        echo "</details>"
    fi
} >"$BASE/table.md"

mkdir -p "$RESULTS"
cp "$BASE/table.md" "$RESULTS/latest.md"
echo
cat "$BASE/table.md"
echo
log "written to bench/results/latest.md"
