#!/bin/bash
# usage: bench/randwrite-ab.sh KMSFS_BIN [MOUNT_OPTS] (root): on a fresh volume, lays out a 256 MiB
# file, then runs fio's 4 KiB buffered psync randwrite (10 s, end_fsync) and randrw (2 jobs,
# 10 s) as bench/run.sh does; prints IOPS and the daemon's CPU-µs per operation for each.
# Alternate binaries or options between calls. PERF=randwrite (or randrw) records
# `perf record -g` of the daemon during that phase into $PERF_OUT (default /var/tmp/PHASE.perf).
set -u
bin=$1; opts=${2:-}
. "$(dirname "$0")/ab-volume.sh"
fio --name=layout --filename="$d/mnt/fio.dat" --size=256M --bs=1M --rw=write --end_fsync=1 \
    --minimal >/dev/null || { echo "fio layout failed"; exit 1; }
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
phase() { # phase NAME FIO_ARGS...
    local name=$1 c0 c1 out r w; shift
    c0=$(cpu)
    out=$(fio --filename="$d/mnt/fio.dat" --size=256M --bs=4k --ioengine=psync --direct=0 \
        --runtime=10 --time_based --minimal --name="$name" "$@") || { echo "fio $name failed"; exit 1; }
    c1=$(cpu)
    r=$(cut -d';' -f6 <<<"$out"); w=$(cut -d';' -f47 <<<"$out")
    echo "$(basename "$bin") ${opts:-default} $name: read iops $(cut -d';' -f8 <<<"$out") write iops $(cut -d';' -f49 <<<"$out") cpu_us/op $(echo "scale=1; ($c1 - $c0) / $tk * 1000000 / (($r + $w) / 4)" | bc)"
}
# perfed NAME FIO_ARGS...: phase, recorded with perf when PERF names it.
perfed() {
    if [ "${PERF:-}" = "$1" ]; then
        perf record -g -o "${PERF_OUT:-/var/tmp/$1.perf}" -p "$pid" 2>/dev/null & ppid=$!
        phase "$@"
        kill -INT "$ppid"; wait "$ppid"
    else
        phase "$@"
    fi
}
perfed randwrite --rw=randwrite --end_fsync=1
perfed randrw --rw=randrw --numjobs=2 --group_reporting
