# Sourced by the A/B scripts (untar-ab.sh, write-ab.sh): a fresh volume in a temporary
# directory under /var/tmp, mounted in the foreground by "$bin" with the options "$opts".
# Sets R (removed at exit, the mount first), d (the volume's directory: d/mnt is the mount
# point, d/log the daemon's log), pid (the daemon) and tk (clock ticks per second).
R=$(mktemp -d /var/tmp/kmsfs-ab.XXXXXX)
pid=
ab_cleanup() {
    if [ -n "$pid" ]; then
        if mountpoint -q "$R/v/mnt"; then
            "$bin" umount "$R/v/mnt" >/dev/null 2>&1 || fusermount3 -u "$R/v/mnt"
        fi
        wait "$pid" 2>/dev/null
    fi
    rm -rf "$R"
}
trap ab_cleanup EXIT
echo "kmsfs-ab-$$-$RANDOM" > "$R/pass"; chmod 600 "$R/pass"
d=$R/v; mkdir -p "$d/backing" "$d/mnt" "$d/home"
export KMSFS_KEYSTORE=$d/keystore KMSFS_PASSPHRASE_FILE=$R/pass HOME=$d/home
tk=$(getconf CLK_TCK)
"$bin" init "$d/backing" >/dev/null 2>&1 || { echo "init failed"; exit 1; }
"$bin" mount -f ${opts:+-o "$opts"} "$d/backing" "$d/mnt" >"$d/log" 2>&1 & pid=$!
for _ in $(seq 100); do mountpoint -q "$d/mnt" && break; sleep 0.1; done
mountpoint -q "$d/mnt" || { echo "mount failed"; cat "$d/log"; exit 1; }
