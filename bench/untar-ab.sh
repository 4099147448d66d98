#!/bin/bash
# usage: bench/untar-ab.sh KMSFS_BIN TARBALL [MOUNT_OPTS] (root): untar TARBALL once into a
# fresh volume; prints wall seconds, the daemon's CPU seconds and context switches (all
# its threads), and the request reader's counts from its log. Alternate binaries or
# options, e.g. "BIN real.tar" and "BIN real.tar spin=0". bench/run.sh builds real.tar
# (the first 20,000 files of Debian's linux-source) in its data directory.
set -u
bin=$1; tarball=$2; opts=${3:-}
R=$(mktemp -d /var/tmp/untar-ab.XXXXXX)
trap 'rm -rf "$R"' EXIT
echo "untar-ab-$$-$RANDOM" > "$R/pass"; chmod 600 "$R/pass"
d=$R/v; mkdir -p "$d/backing" "$d/mnt" "$d/home"
export KMSFS_KEYSTORE=$d/keystore KMSFS_PASSPHRASE_FILE=$R/pass HOME=$d/home
tk=$(getconf CLK_TCK)
"$bin" init "$d/backing" >/dev/null 2>&1 || { echo "init failed"; exit 1; }
"$bin" mount -f ${opts:+-o "$opts"} "$d/backing" "$d/mnt" >"$d/log" 2>&1 & pid=$!
for _ in $(seq 100); do mountpoint -q "$d/mnt" && break; sleep 0.1; done
mountpoint -q "$d/mnt" || { echo "mount failed"; cat "$d/log"; kill "$pid"; exit 1; }
cs() { cat /proc/$pid/task/*/status | awk '/ctxt_switches/ {s += $2} END {print s}'; }
x0=$(cs); c0=$(awk '{print $14 + $15}' /proc/$pid/stat); t0=$(date +%s.%N)
tar -xf "$tarball" -C "$d/mnt"
x1=$(cs); c1=$(awk '{print $14 + $15}' /proc/$pid/stat); t1=$(date +%s.%N)
echo "$(basename "$bin") ${opts:-default}: untar $(echo "$t1 - $t0" | bc) s, daemon CPU $(echo "scale=2; ($c1 - $c0) / $tk" | bc) s, context switches $((x1 - x0))"
"$bin" umount "$d/mnt" >/dev/null 2>&1 || fusermount3 -u "$d/mnt"
wait "$pid"
grep -h "fuse lead" "$d/log" | sed 's/.*fuse lead/fuse lead/'
