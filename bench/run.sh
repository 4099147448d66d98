#!/usr/bin/env bash
# Side-by-side benchmark: the same workloads, in one run, on the same disk, on
#   plain      a plain directory
#   bindfs     FUSE without any crypto (--multithreaded): the ceiling of any FUSE fs
#   kmsfs      this project (target/release/kmsfs, built here, or KMSFS_BIN)
#   gocryptfs, securefs, cryfs   the peers (Debian packages)
# plus variant columns (BENCH_VARIANTS, see bench/fs.sh): kmsfs with other mount
# options, environment or kernel settings, set before the column and restored after.
# Each run measures every column in turn (the order rotates from run to run), each
# on a fresh volume; medians and min-max over BENCH_RUNS runs. For every workload
# the figure and the FUSE daemon's CPU seconds (utime + stime of its process).
# Workloads (docs/BENCHMARKS.md describes each):
#   write, read (cold), 2 readers of 2 files and of 1 file (cold)     MB/s
#   untar of a real source tree (Debian's linux-source, first 20,000 files) and
#   of a synthetic tree, each + flush; ls -lR, find|xargs cat (cold); rm -rf     s
#   create, stat (cold), unlink of 10,000 files                                   s
#   fio 4 KiB randwrite, randread (cold), randrw 2 jobs (cold)                    IOPS
#   kmsfs only: `kmsfs snapshot create` on a mounted volume of 10 MiB and 10 GiB  s
# "Cold": unmount, drop the page cache, remount, then fincore checks that the
# column's backing files are out of the page cache (the fraction is reported).
# Writes bench/results/latest.md (+ latest.png; latest.tsv and latest.meta.tsv, the raw
# figures from which bench/report.py draws both). Reported, never judged.
#
# Usage: bench/run.sh                 (as root; about an hour, see docs/BENCHMARKS.md)
#        BENCH_QUICK=1 bench/run.sh   (small sizes, 1 run, no CryFS unless in BENCH_FS: a few minutes)
# Environment:
#   BENCH_RUNS=3  BENCH_SIZE_MB=1024  BENCH_REAL_FILES=20000  BENCH_FILES=5000
#   BENCH_DIRS=200  BENCH_META_FILES=10000  BENCH_FIO_MB=256  BENCH_FIO_SECS=10
#   BENCH_SNAP_GB=10 (0: skip the big snapshot)   BENCH_REAL_SRC=DIR (instead of linux-source)
#   BENCH_FS="plain bindfs kmsfs gocryptfs securefs cryfs"   columns
#   BENCH_VARIANTS="kmsfs-bigreq:sysctl=fs/fuse/max_pages_limit=1024 kmsfs-ra:readahead=4096"
#   BENCH_DIR=/var/tmp   scratch location (same disk for all)
#   BENCH_NO_INSTALL=1   no apt-get;   BENCH_KEEP=1   keep the scratch directory
#   BENCH_VERBOSE=1      log every step with the time
#   BENCH_OUT=DIR        where latest.{md,png,tsv} go (default bench/results)
#   KMSFS_BIN=path       this kmsfs binary instead of building one
set -euo pipefail
export LC_ALL=C
BENCH_SRC="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$BENCH_SRC/../scripts/lib.sh"
# shellcheck source=bench/fs.sh
. "$BENCH_SRC/fs.sh"
cd "$KMSFS_ROOT"

if [ -n "${BENCH_QUICK:-}" ]; then
    : "${BENCH_RUNS:=1}" "${BENCH_SIZE_MB:=256}" "${BENCH_FIO_SECS:=5}" "${BENCH_FIO_MB:=128}"
    : "${BENCH_REAL_FILES:=5000}" "${BENCH_FILES:=2000}" "${BENCH_META_FILES:=2000}" "${BENCH_SNAP_GB:=0}"
    # CryFS derives its key (scrypt) at every mount: its 11 remounts alone take minutes.
    : "${BENCH_FS:=plain bindfs kmsfs gocryptfs securefs}"
fi
RUNS="${BENCH_RUNS:-3}"
SIZE_MB="${BENCH_SIZE_MB:-1024}"
REAL_FILES="${BENCH_REAL_FILES:-20000}"
NFILES="${BENCH_FILES:-5000}"
NDIRS="${BENCH_DIRS:-200}"
META_FILES="${BENCH_META_FILES:-10000}"
FIO_MB="${BENCH_FIO_MB:-256}"
FIO_SECS="${BENCH_FIO_SECS:-10}"
SNAP_GB="${BENCH_SNAP_GB:-10}"
WANT_FS="${BENCH_FS:-plain bindfs kmsfs gocryptfs securefs cryfs}"
OUT="${BENCH_OUT:-$KMSFS_ROOT/bench/results}"
CLK_TCK="$(getconf CLK_TCK)"

[ "$(id -u)" -eq 0 ] || die "run as root (FUSE mounts, dropping the page cache, kernel settings)"
exec </dev/null

# ---------------------------------------------------------------- columns
for fs in $WANT_FS; do
    case "$fs" in
        plain | bindfs | kmsfs | gocryptfs | securefs | cryfs) col_define "$fs" ;;
        *) die "unknown file system in BENCH_FS: $fs (plain bindfs kmsfs gocryptfs securefs cryfs)" ;;
    esac
done
VARIANT_COLS=()
for v in ${BENCH_VARIANTS:-}; do
    name="${v%%:*}"
    levers=""
    [ "$name" = "$v" ] || levers="${v#*:}"
    [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die "bad variant name '$name' in BENCH_VARIANTS"
    [ -z "${COL_BASE[$name]:-}" ] || die "variant $name repeats a column name"
    col_define "$name" "$levers"
    why="$(lever_check "$name")"
    [ -z "$why" ] || die "BENCH_VARIANTS $name: $why"
    VARIANT_COLS+=("$name")
done

# ---------------------------------------------------------------- install, build
wants() { local c; for c in "${!COL_BASE[@]}"; do [ "${COL_BASE[$c]}" = "$1" ] && return 0; done; return 1; }
if [ -z "${BENCH_NO_INSTALL:-}" ]; then
    apt_install fuse3 fio tar coreutils util-linux perl gnuplot-nox xz-utils
    command -v python3 >/dev/null 2>&1 || apt_install python3
    [ -n "${BENCH_REAL_SRC:-}" ] || apt_install_optional linux-source
    for fs in bindfs gocryptfs securefs cryfs; do
        wants "$fs" && apt_install_optional "$fs"
    done
fi
need_fuse
for t in fio fincore perl python3 xz; do command -v "$t" >/dev/null || die "$t is missing (apt-get install it, or run without BENCH_NO_INSTALL)"; done

KMSFS="${KMSFS_BIN:-$KMSFS_ROOT/target/release/kmsfs}"
if [ -z "${KMSFS_BIN:-}" ] && wants kmsfs; then
    need_cargo
    log "building kmsfs (release)"
    cargo build --release --bins || log "warning: the kmsfs build failed; its columns will be empty"
fi

COLS=()
declare -A SKIP=()
for c in plain bindfs kmsfs gocryptfs securefs cryfs "${VARIANT_COLS[@]}"; do
    [ -n "${COL_BASE[$c]:-}" ] || continue
    base="${COL_BASE[$c]}"
    case "$base" in
        plain) ;;
        kmsfs)
            b="$(kmsfs_bin "$c")"
            h="$([ -x "$b" ] && "$b" mount --help 2>/dev/null)" || h=""
            if [[ "$h" != *--foreground* ]]; then
                SKIP[$c]="$b is missing or has no \`mount --foreground\`"
            fi
            ;;
        *) command -v "$base" >/dev/null 2>&1 || SKIP[$c]="$base is not installed" ;;
    esac
    COLS+=("$c")
done
[ "${#COLS[@]}" -gt 0 ] || die "nothing to measure"

# ---------------------------------------------------------------- scratch, cleanup
mkdir -p "${BENCH_DIR:-/var/tmp}"
BASE="$(mktemp -d "${BENCH_DIR:-/var/tmp}/kmsfs-bench.XXXXXX")"
DATA="$BASE/data"
RAW="$BASE/raw.tsv"
RESTORE_FILE="$BASE/restore.tsv"
: >"$RAW"
: >"$RESTORE_FILE"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    fs_cleanup
    if [ -n "${BENCH_KEEP:-}" ]; then
        log "scratch kept in $BASE"
    else
        rm -rf "$BASE"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

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
log "generating 2 x $SIZE_MB MiB of random data and a $NFILES-file synthetic tree"
dd if=/dev/urandom of="$DATA/random.bin" bs=1M count="$SIZE_MB" status=none
dd if=/dev/urandom of="$DATA/random2.bin" bs=1M count="$SIZE_MB" status=none
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
        my $dir = sprintf("%s/synth/d%02d/s%03d", $root, $d % $top, $d);
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
' "$DATA/t" "$NFILES" "$NDIRS"
TAR_DET=(--sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner)
tar -C "$DATA/t" "${TAR_DET[@]}" -cf "$DATA/synth.tar" synth
SYNTH_MB="$(du -sm "$DATA/t/synth" | cut -f1)"
rm -rf "$DATA/t"

# The real tree: the first REAL_FILES files, in name order, of Debian's kernel
# source (or of BENCH_REAL_SRC), as a deterministic tarball with top dir real/.
mkdir -p "$DATA/r"
if [ -n "${BENCH_REAL_SRC:-}" ]; then
    [ -d "$BENCH_REAL_SRC" ] || die "BENCH_REAL_SRC=$BENCH_REAL_SRC is not a directory"
    log "real tree: the first $REAL_FILES files of $BENCH_REAL_SRC"
    (cd "$BENCH_REAL_SRC" && find . -type f | sed 's,^\./,,' | sort | sed -n "1,${REAL_FILES}p") >"$DATA/r.list"
    mkdir -p "$DATA/r/real"
    tar -C "$BENCH_REAL_SRC" -cf - -T "$DATA/r.list" | tar -C "$DATA/r/real" -xf -
    REAL_DESC="the first $REAL_FILES files (by name) of $BENCH_REAL_SRC"
else
    XZ="$(find /usr/src -maxdepth 1 -name 'linux-source-*.tar.xz' | sort -V | tail -1)"
    [ -n "$XZ" ] || die "no /usr/src/linux-source-*.tar.xz: apt-get install linux-source, or set BENCH_REAL_SRC=DIR"
    log "real tree: the first $REAL_FILES files (by name) of $XZ"
    tar -tJf "$XZ" | grep -v '/$' | sort | sed -n "1,${REAL_FILES}p" >"$DATA/r.list"
    tar -C "$DATA/r" -xJf "$XZ" -T "$DATA/r.list"
    top="$(head -1 "$DATA/r.list" | cut -d/ -f1)"
    mv "$DATA/r/$top" "$DATA/r/real"
    REAL_DESC="the first $REAL_FILES entries (by name) of $(basename "$XZ") (Debian $(dpkg-query -W -f='${Package} ${Version}' "$(basename "$XZ" .tar.xz)" 2>/dev/null || echo linux-source))"
fi
tar -C "$DATA/r" "${TAR_DET[@]}" -cf "$DATA/real.tar" real
REAL_MB="$(du -sm "$DATA/r/real" | cut -f1)"
REAL_N="$(find "$DATA/r/real" ! -type d | wc -l)"
REAL_SHA="$(sha256sum "$DATA/real.tar" | cut -c1-16)"
rm -rf "$DATA/r"
# Non-directory entries expected on a volume after both untars.
TREE_N=$((REAL_N + NFILES))

PASS="$BASE/passphrase"
head -c 24 /dev/urandom | base64 >"$PASS"
chmod 600 "$PASS"

# ---------------------------------------------------------------- measuring
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", b - a }'; }
diffcpu() { if [ -n "$1" ] && [ -n "$2" ]; then awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; fi; }
mbps() { awk -v s="$1" -v n="$2" 'BEGIN { printf "%.1f", n * 1.048576 / s }'; }

# rec COL METRIC VALUE [CPU_S [WORK]]: one raw figure of this run.
rec() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$RUN" "$1" "$2" "$3" "${4:-}" "${5:-}" >>"$RAW"; }
# note COL KIND TEXT: a remark (kind: na, fail, cold).
note() { printf '%s\t%s\t#:%s\t\t\t%s\n' "$RUN" "$1" "$2" "$3" >>"$RAW"; }

# machine_ticks: "busy total" clock ticks of all CPUs so far (/proc/stat; idle and
# iowait count as not busy: a CPU waiting for the disk could have run something).
# Steal counts as busy (the CPU was not there to use); guest time is already in user.
machine_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= 9 && i <= NF; i++) t += $i; print t - $5 - $6, t; exit }' /proc/stat; }
T0="" C0="" M0="" DT="" DCPU="" MBUSY=""
m_start() { C0="$(cpu_now)"; M0="$(machine_ticks)"; T0="$(now)"; }
m_stop() {
    local t1
    t1="$(now)"
    DT="$(elapsed "$T0" "$t1")"
    DCPU="$(diffcpu "$C0" "$(cpu_now)")"
    # The share of the whole machine's CPU time that was busy (every process, the
    # kernel's too) during the workload: how much room a second reader had.
    MBUSY="$(awk -v a="$M0" -v b="$(machine_ticks)" 'BEGIN { split(a, x, " "); split(b, y, " ");
        if (y[2] > x[2]) printf "%.3f", (y[1] - x[1]) / (y[2] - x[2]) }')"
}

STEP="" WHY=""
# step NAME: the step being run (for failure reasons; logged with BENCH_VERBOSE=1).
step() {
    STEP="$1"
    vlog "$STEP"
}
vlog() { [ -z "${BENCH_VERBOSE:-}" ] || log "  $(date +%T) $*"; }
fail() { WHY="$STEP: $*"; return 1; }

# cold COL DIR STEP: unmount, drop the page cache, remount, record the cached
# fraction of the column's backing files.
cold() {
    local f
    vlog "cold: unmount"
    fs_unmount "$1" "$2" || { fail "unmount before the cold step failed"; return 1; }
    vlog "cold: drop caches"
    drop_caches
    vlog "cold: mount"
    fs_mount "$1" "$2" || { fail "remount failed ${LEVER_FAIL:+($LEVER_FAIL)}"; return 1; }
    vlog "cold: fincore"
    f="$(cold_frac "$(fs_store "$1" "$2")")"
    vlog "cold: done"
    rec "$1" "cold:$3" "${f% *}" "" "${f#* }"
}

gib() { awk -v m="$1" 'BEGIN { printf "%.4f", m / 1024 }'; }

# dd_read FILE... : reads the files concurrently; sets DT and DCPU.
dd_read() {
    local pids=() f p ok=0
    m_start
    for f in "$@"; do
        dd if="$f" of=/dev/null bs=1M status=none &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || ok=1; done
    m_stop
    return "$ok"
}

FIO_VERSION="$(fio --version)"
fio_run() { # fio_run LOG ARGS... -> terse line
    local log="$1"
    shift
    fio --filename="$m/fio.dat" --size="${FIO_MB}M" --bs=4k --ioengine=psync --direct=0 \
        --runtime="$FIO_SECS" --time_based --minimal "$@" 2>>"$log"
}

# col_round COL: every workload on a fresh volume of COL.
col_round() {
    local col="$1" d="$BASE/$1-$RUN" m out n r w
    m="$d/mnt"
    # Every column starts on a clean disk: the previous column's dirty pages
    # (its volume, just removed, or the plain column's files) are not written
    # back during this column's first workload.
    sync
    step create
    fs_create "$col" "$d" || { fail "$(tail -3 "$d/init.log" 2>/dev/null)"; return 1; }
    fs_mount "$col" "$d" || { fail "${LEVER_FAIL:-$(tail -3 "$d/mount.log" 2>/dev/null)}"; return 1; }

    step write
    cat "$DATA/random.bin" "$DATA/random2.bin" >/dev/null
    m_start
    dd if="$DATA/random.bin" of="$m/big" bs=1M conv=fsync status=none || { fail "dd failed"; return 1; }
    m_stop
    rec "$col" write "$(mbps "$DT" "$SIZE_MB")" "$DCPU" "$(gib "$SIZE_MB")"
    rec "$col" busy:write "$MBUSY"
    dd if="$DATA/random2.bin" of="$m/big2" bs=1M conv=fsync status=none || { fail "dd of the second file failed"; return 1; }

    step read
    cold "$col" "$d" read || return 1
    dd_read "$m/big" || { fail "dd failed"; return 1; }
    rec "$col" read "$(mbps "$DT" "$SIZE_MB")" "$DCPU" "$(gib "$SIZE_MB")"
    rec "$col" busy:read "$MBUSY"
    if [ "$RUN" = 1 ]; then
        cmp -s "$DATA/random.bin" "$m/big" || { fail "the file reads back WRONG"; return 1; }
        cmp -s "$DATA/random2.bin" "$m/big2" || { fail "the second file reads back WRONG"; return 1; }
    fi
    step read2diff
    cold "$col" "$d" read2diff || return 1
    dd_read "$m/big" "$m/big2" || { fail "dd failed"; return 1; }
    rec "$col" read2diff "$(mbps "$DT" $((2 * SIZE_MB)))" "$DCPU" "$(gib $((2 * SIZE_MB)))"
    rec "$col" busy:read2diff "$MBUSY"
    step read2same
    cold "$col" "$d" read2same || return 1
    dd_read "$m/big" "$m/big" || { fail "dd failed"; return 1; }
    rec "$col" read2same "$(mbps "$DT" $((2 * SIZE_MB)))" "$DCPU" "$(gib $((2 * SIZE_MB)))"
    rm -f "$m/big" "$m/big2" || { fail "rm failed"; return 1; }

    local t
    for t in real synth; do
        step "untar_$t"
        cat "$DATA/$t.tar" >/dev/null
        m_start
        # tar's exit status is not fatal (CryFS makes it complain "Directory renamed
        # before its status could be extracted" at 20,000 files): the entry count
        # below decides, and the complaint is reported.
        if ! tar -C "$m" -xf "$DATA/$t.tar" 2>"$d/tar.err"; then
            note "$col" warn "untar of the $t tree: $(grep -v '^tar: Exiting' "$d/tar.err" | head -2 | tr '\n' ' ')"
            log "$col: tar complained: $(head -1 "$d/tar.err")"
        fi
        # The flush: a FUSE daemon's deferred work ends when it exits after the
        # unmount; its data is then in the backing file system's page cache, where
        # plain's already is (no sync for anyone: the disk is measured by write).
        if [ "${COL_BASE[$col]}" != plain ]; then
            fs_unmount "$col" "$d" || { fail "the flush (unmount) failed"; return 1; }
        fi
        m_stop
        rec "$col" "untar_$t" "$DT" "$DCPU"
        if [ "${COL_BASE[$col]}" != plain ]; then
            fs_mount "$col" "$d" || { fail "remount failed"; return 1; }
        fi
    done
    n="$(find "$m" ! -type d | wc -l)"
    [ "$n" -eq "$TREE_N" ] || { fail "$n entries after untar, expected $TREE_N"; return 1; }

    step ls
    cold "$col" "$d" ls || return 1
    m_start
    ls -lR "$m" >/dev/null || { fail "ls failed"; return 1; }
    m_stop
    rec "$col" ls "$DT" "$DCPU"

    step catall
    cold "$col" "$d" catall || return 1
    m_start
    (cd "$m" && find . -type f -print0 | xargs -0 cat >/dev/null) || { fail "find | xargs cat failed"; return 1; }
    m_stop
    rec "$col" catall "$DT" "$DCPU"

    step rm
    m_start
    rm -rf "$m/real" "$m/synth" || { fail "rm failed"; return 1; }
    m_stop
    rec "$col" rm "$DT" "$DCPU"

    # create / stat (cold) / unlink of META_FILES empty files in 10 directories,
    # one perl process each (no fork per file).
    local meta='my ($op, $root, $n) = @ARGV;
        if ($op eq "create") { mkdir $root or die "$root: $!" }
        for my $i (0 .. $n - 1) {
            my $d = sprintf("%s/m%d", $root, $i % 10);
            my $p = sprintf("%s/f%06d", $d, $i);
            if ($op eq "create") { mkdir $d if $i < 10; open(my $f, ">", $p) or die "$p: $!"; close $f }
            elsif ($op eq "stat") { lstat($p) or die "$p: $!" }
            else { unlink($p) or die "$p: $!" }
        }'
    step create
    m_start
    perl -e "$meta" create "$m/meta" "$META_FILES" || { fail "perl create failed"; return 1; }
    m_stop
    rec "$col" create "$DT" "$DCPU"
    step stat
    cold "$col" "$d" stat || return 1
    m_start
    perl -e "$meta" stat "$m/meta" "$META_FILES" || { fail "perl stat failed"; return 1; }
    m_stop
    rec "$col" stat "$DT" "$DCPU"
    step unlink
    m_start
    perl -e "$meta" unlink "$m/meta" "$META_FILES" || { fail "perl unlink failed"; return 1; }
    m_stop
    rec "$col" unlink "$DT" "$DCPU"
    rm -rf "$m/meta"

    # fio: lay the file out (not measured), then the three phases.
    step fio
    fio --name=layout --filename="$m/fio.dat" --size="${FIO_MB}M" --bs=1M --rw=write --end_fsync=1 \
        --minimal >/dev/null 2>>"$d/fio.log" || { fail "fio layout failed: $(tail -2 "$d/fio.log")"; return 1; }
    step randwrite
    m_start
    out="$(fio_run "$d/fio.log" --name=randwrite --rw=randwrite --end_fsync=1)" || { fail "fio failed: $(tail -2 "$d/fio.log")"; return 1; }
    m_stop
    rec "$col" randwrite "$(cut -d';' -f49 <<<"$out")" "$DCPU" "$(cut -d';' -f47 <<<"$out" | awk '{ print int($1 / 4) }')"
    step randread
    cold "$col" "$d" randread || return 1
    m_start
    out="$(fio_run "$d/fio.log" --name=randread --rw=randread)" || { fail "fio failed: $(tail -2 "$d/fio.log")"; return 1; }
    m_stop
    rec "$col" randread "$(cut -d';' -f8 <<<"$out")" "$DCPU" "$(cut -d';' -f6 <<<"$out" | awk '{ print int($1 / 4) }')"
    step randrw
    cold "$col" "$d" randrw || return 1
    m_start
    out="$(fio_run "$d/fio.log" --name=randrw --rw=randrw --numjobs=2 --group_reporting)" || { fail "fio failed: $(tail -2 "$d/fio.log")"; return 1; }
    m_stop
    r="$(cut -d';' -f6 <<<"$out")" w="$(cut -d';' -f47 <<<"$out")"
    rec "$col" randrw_read "$(cut -d';' -f8 <<<"$out")" "$DCPU" "$(awk -v r="$r" -v w="$w" 'BEGIN { print int((r + w) / 4) }')"
    rec "$col" randrw_write "$(cut -d';' -f49 <<<"$out")"

    step unmount
    fs_unmount "$col" "$d" || { fail "unmount failed"; return 1; }
    rm -rf "$d"
    [ "${COL_BASE[$col]}" = kmsfs ] || return 0

    # kmsfs only: snapshot create through the CLI on a mounted volume of 10 MiB,
    # then of SNAP_GB GiB (files of SIZE_MB random bytes, fsynced).
    d="$BASE/$col-$RUN-snap"
    m="$d/mnt"
    step snapshot
    fs_create "$col" "$d" || { fail "init failed"; return 1; }
    fs_mount "$col" "$d" || { fail "mount failed"; return 1; }
    local envs=() k have i=0
    mapfile -t envs < <(col_env "$col" "$d")
    k="$(kmsfs_bin "$col")"
    dd if="$DATA/random.bin" of="$m/small" bs=1M count=10 conv=fsync status=none || { fail "dd failed"; return 1; }
    m_start
    env "${envs[@]}" "$k" snapshot create "$d/backing" s-small >>"$d/snap.log" 2>&1 || { fail "$(tail -2 "$d/snap.log")"; return 1; }
    m_stop
    rec "$col" snap_small "$DT" "$DCPU"
    if [ "$SNAP_GB" -gt 0 ]; then
        have=10
        while [ "$have" -lt $((SNAP_GB * 1024)) ]; do
            dd if="$DATA/random.bin" of="$m/fill$i" bs=1M conv=fsync status=none || { fail "filling to $SNAP_GB GiB failed"; return 1; }
            have=$((have + SIZE_MB)) i=$((i + 1))
        done
        m_start
        env "${envs[@]}" "$k" snapshot create "$d/backing" s-big >>"$d/snap.log" 2>&1 || { fail "$(tail -2 "$d/snap.log")"; return 1; }
        m_stop
        rec "$col" snap_big "$DT" "$DCPU"
    fi
    fs_unmount "$col" "$d" || { fail "unmount failed"; return 1; }
    rm -rf "$d"
}

# ---------------------------------------------------------------- run
declare -A FAILED=()
START=$(now)
for c in "${COLS[@]}"; do
    [ -z "${SKIP[$c]:-}" ] || { RUN=0 note "$c" na "${SKIP[$c]}"; log "$c: n/a: ${SKIP[$c]}"; }
done
NC=${#COLS[@]}
for ((RUN = 1; RUN <= RUNS; RUN++)); do
    for ((k = 0; k < NC; k++)); do
        col="${COLS[$(((k + RUN - 1) % NC))]}"
        [ -z "${SKIP[$col]:-}" ] && [ -z "${FAILED[$col]:-}" ] || continue
        log "run $RUN/$RUNS: $col"
        if ! why="$(levers_before "$col")"; then
            SKIP[$col]="$why"
            note "$col" na "$why"
            log "$col: n/a: $why"
            continue
        fi
        WHY=""
        t_col="$(now)"
        if col_round "$col"; then
            log "$col: run $RUN done in $(elapsed "$t_col" "$(now)" | cut -d. -f1) s"
        else
            if [ -n "$LEVER_FAIL" ]; then
                SKIP[$col]="$LEVER_FAIL"
                note "$col" na "$LEVER_FAIL"
                log "$col: n/a: $LEVER_FAIL"
            else
                FAILED[$col]=1
                note "$col" fail "${WHY:-failed}"
                log "$col: FAILED in run $RUN ($WHY); left out of later runs"
            fi
            fs_unmount "$col" "$BASE/$col-$RUN" >/dev/null 2>&1 || fs_cleanup
            for dd in "$BASE/$col-$RUN" "$BASE/$col-$RUN-snap"; do
                [ -n "${BENCH_KEEP:-}" ] || mountpoint -q "$dd/mnt" || rm -rf "$dd"
            done
        fi
        levers_restore
    done
done
TOTAL="$(elapsed "$START" "$(now)")"

# ---------------------------------------------------------------- report
versions() {
    local c="$1" b="${COL_BASE[$1]}"
    case "$b" in
        plain) echo "plain directory ($(df --output=fstype "$BASE" | tail -1))" ;;
        bindfs) echo "$(bindfs --version 2>/dev/null | head -1) (--multithreaded, no crypto)" ;;
        kmsfs) echo "kmsfs $("$(kmsfs_bin "$c")" --version 2>/dev/null | awk '{ print $NF }') (aes-256-gcm-siv, default block size)" ;;
        gocryptfs) echo "$(gocryptfs -version 2>/dev/null | head -1 | cut -d';' -f1) (AES-256-GCM)" ;;
        cryfs) echo "$(cryfs --version 2>/dev/null | head -1 | sed 's/ Version//') (xchacha20-poly1305, 16 KiB blocks)" ;;
        securefs) echo "securefs $(dpkg-query -W -f='${Version}' securefs 2>/dev/null) (format 4)" ;;
    esac
}
META="$BASE/meta.tsv"
{
    printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf 'commit\t%s\n' "$(git_commit)"
    printf 'kmsfs_bin\t%s\n' "$KMSFS"
    printf 'kernel\t%s\n' "$(uname -r)"
    printf 'cpu\t%s cores (%s)\n' "$(nproc)" "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    printf 'ram\t%s GiB\n' "$(free -g | awk '/^Mem:/ { print $2 }')"
    printf 'disk\t%s (%s), under %s\n' "$(df --output=source "$BASE" | tail -1)" "$(df --output=fstype "$BASE" | tail -1)" "${BENCH_DIR:-/var/tmp}"
    printf 'runs\t%s\n' "$RUNS"
    printf 'total_s\t%s\n' "${TOTAL%.*}"
    printf 'size_mb\t%s\n' "$SIZE_MB"
    printf 'real_desc\t%s\n' "$REAL_DESC"
    printf 'real_files\t%s\n' "$REAL_N"
    printf 'real_mb\t%s\n' "$REAL_MB"
    printf 'real_sha\t%s\n' "$REAL_SHA"
    printf 'synth_files\t%s\n' "$NFILES"
    printf 'synth_dirs\t%s\n' "$NDIRS"
    printf 'synth_mb\t%s\n' "$SYNTH_MB"
    printf 'meta_files\t%s\n' "$META_FILES"
    printf 'fio_mb\t%s\n' "$FIO_MB"
    printf 'fio_secs\t%s\n' "$FIO_SECS"
    printf 'fio\t%s\n' "$FIO_VERSION"
    printf 'snap_gb\t%s\n' "$SNAP_GB"
    printf 'can_drop\t%s\n' "$CAN_DROP"
    printf 'quick\t%s\n' "${BENCH_QUICK:-}"
    printf 'clk_tck\t%s\n' "$CLK_TCK"
    printf 'columns\t%s\n' "${COLS[*]}"
    for c in "${COLS[@]}"; do
        printf 'version:%s\t%s\n' "$c" "$(versions "$c")"
        printf 'levers:%s\t%s\n' "$c" "${COL_LEVERS[$c]}"
        printf 'base:%s\t%s\n' "$c" "${COL_BASE[$c]}"
    done
} >"$META"

mkdir -p "$OUT"
cp "$RAW" "$OUT/latest.tsv"
cp "$META" "$OUT/latest.meta.tsv"
python3 "$BENCH_SRC/report.py" "$META" "$RAW" "$OUT/latest.md" "$OUT/latest.png" ||
    log "warning: the report failed; the raw figures are in $OUT/latest.tsv"
echo
cat "$OUT/latest.md"
echo
log "written to $OUT/latest.md, latest.png, latest.tsv (every run's raw figures) and latest.meta.tsv"
