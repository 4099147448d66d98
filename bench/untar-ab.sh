#!/bin/bash
# usage: bench/untar-ab.sh KMSFS_BIN TARBALL [MOUNT_OPTS] (root): untar TARBALL once into a
# fresh volume; prints wall seconds, the daemon's CPU seconds and context switches (all
# its threads), and the request reader's counts from its log. Alternate binaries or
# options, e.g. "BIN real.tar" and "BIN real.tar spin=0". bench/run.sh builds real.tar
# (the first 20,000 files of Debian's linux-source) in its data directory.
set -u
bin=$1; tarball=$2; opts=${3:-}
. "$(dirname "$0")/ab-volume.sh"
cs() { cat /proc/$pid/task/*/status | awk '/ctxt_switches/ {s += $2} END {print s}'; }
x0=$(cs); c0=$(awk '{print $14 + $15}' /proc/$pid/stat); t0=$(date +%s.%N)
tar -xf "$tarball" -C "$d/mnt"
x1=$(cs); c1=$(awk '{print $14 + $15}' /proc/$pid/stat); t1=$(date +%s.%N)
echo "$(basename "$bin") ${opts:-default}: untar $(echo "$t1 - $t0" | bc) s, daemon CPU $(echo "scale=2; ($c1 - $c0) / $tk" | bc) s, context switches $((x1 - x0))"
"$bin" umount "$d/mnt" >/dev/null 2>&1 || fusermount3 -u "$d/mnt"
wait "$pid"; pid=; t2=$(date +%s.%N)
echo "  unmount and daemon exit (the flush) $(echo "$t2 - $t1" | bc) s: untar + flush $(echo "$t2 - $t0" | bc) s"
grep -h "fuse lead" "$d/log" | sed 's/.*fuse lead/fuse lead/'
