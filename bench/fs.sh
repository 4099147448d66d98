# File systems for bench/run.sh: create, mount (daemon in the foreground, so its
# PID is known), unmount (waiting for the daemon), its CPU seconds, the cold-cache
# check, and the levers of variant columns. Sourced by run.sh; do not run it.
# shellcheck shell=bash
#
# A column is a name: a base file system (plain bindfs kmsfs gocryptfs securefs
# cryfs), or a variant "BASE-SUFFIX" (BASE defaults to kmsfs when the name starts
# with something else) with levers, given in BENCH_VARIANTS as
#   NAME:LEVER[:LEVER...] [NAME:LEVER...]
# Levers:
#   sysctl=KEY=VALUE   /proc/sys/KEY (dots or slashes), set before the column's
#                      mount, restored after the column (and on exit)
#   sys=PATH=VALUE     any file under /sys or /proc/sys, same life cycle
#   bdi=ATTR=VALUE     /sys/class/bdi/MAJ:MIN/ATTR of the mount (found from its
#                      st_dev), set after every mount of the column, restored after
#   readahead=KB       short for bdi=read_ahead_kb=KB
#   opt=OPTIONS        extra -o mount options (kmsfs and bindfs only)
#   env=VAR=VALUE      environment of the daemon and of the kmsfs CLI
#   bin=PATH           another kmsfs binary (kmsfs variants)
# A lever that cannot be set makes the column n/a (with the reason), not a failure.

declare -A COL_BASE=() COL_LEVERS=() COL_NA=()

# col_define NAME [LEVERS]: registers a column; LEVERS is the ':'-separated list.
col_define() {
    local name="$1" levers="${2:-}" base="${1%%-*}"
    case "$base" in
        plain | bindfs | kmsfs | gocryptfs | securefs | cryfs) ;;
        *) base=kmsfs ;;
    esac
    COL_BASE[$name]="$base"
    COL_LEVERS[$name]="$levers"
}

# Lever values of a column: lever_get COL KIND prints each value of that kind.
lever_get() {
    local l all=()
    IFS=: read -ra all <<<"${COL_LEVERS[$1]:-}"
    for l in "${all[@]}"; do
        case "$l" in "$2="*) printf '%s\n' "${l#"$2"=}" ;; esac
    done
}

# lever_check COL: the syntax of every lever; prints the first problem.
lever_check() {
    local col="$1" l base="${COL_BASE[$1]}" all=()
    IFS=: read -ra all <<<"${COL_LEVERS[$1]:-}"
    for l in "${all[@]}"; do
        case "$l" in
            sysctl=*=* | sys=/sys/*=* | sys=/proc/sys/*=* | bdi=*=* | env=*=*) ;;
            readahead=*) [[ "${l#readahead=}" =~ ^[0-9]+$ ]] || { echo "readahead wants KiB: $l"; return; } ;;
            opt=*) case "$base" in kmsfs | bindfs) ;; *) echo "opt= is for kmsfs and bindfs columns, not $base"; return ;; esac ;;
            bin=*) [ "$base" = kmsfs ] || { echo "bin= is for kmsfs columns"; return; }
                [ -x "${l#bin=}" ] || { echo "${l#bin=} is not an executable"; return; } ;;
            *) echo "unknown lever '$l' (sysctl= sys= bdi= readahead= opt= env= bin=)"; return ;;
        esac
    done
}

# ------------------------------------------------------------------ settings
# Every file written by a lever is saved here first (path TAB old value), and
# restored by levers_restore, in reverse order.
RESTORE_FILE=""

# setting_write PATH VALUE: prints an error and returns 1 when it cannot.
setting_write() {
    local path="$1" value="$2" old err now
    [ -e "$path" ] || { echo "$path does not exist (kernel without this setting?)"; return 1; }
    old="$(cat "$path" 2>&1)" || { echo "cannot read $path: $old"; return 1; }
    err="$( { printf '%s\n' "$value" >"$path"; } 2>&1)" || {
        echo "cannot write $value to $path: ${err##*: }"
        return 1
    }
    printf '%s\t%s\n' "$path" "$old" >>"$RESTORE_FILE"
    now="$(cat "$path" 2>/dev/null)"
    [ "$now" = "$value" ] || { echo "$path kept $now when $value was written"; return 1; }
}

levers_restore() {
    [ -n "$RESTORE_FILE" ] && [ -s "$RESTORE_FILE" ] || return 0
    local path old
    while IFS=$'\t' read -r path old; do
        # A bdi goes away with its FUSE mount: nothing to restore then.
        [ -e "$path" ] && { printf '%s\n' "$old" >"$path"; } 2>/dev/null || true
    done < <(tac "$RESTORE_FILE")
    : >"$RESTORE_FILE"
}

# levers_before COL: the sysctl=/sys= levers, before the column's first mount.
# Prints the reason and returns 1 when one cannot be set (the rest is undone).
levers_before() {
    local col="$1" v key err
    while IFS= read -r v; do
        [ -n "$v" ] || continue
        key="${v%%=*}"
        err="$(setting_write "/proc/sys/${key//.//}" "${v#*=}")" || { levers_restore; echo "$err"; return 1; }
    done < <(lever_get "$col" sysctl)
    while IFS= read -r v; do
        [ -n "$v" ] || continue
        err="$(setting_write "${v%%=*}" "${v#*=}")" || { levers_restore; echo "$err"; return 1; }
    done < <(lever_get "$col" sys)
}

# levers_after_mount COL DIR: the bdi levers of the file system at DIR.
levers_after_mount() {
    local col="$1" dir="$2" v dev err
    local list
    list="$( { lever_get "$col" bdi; lever_get "$col" readahead | sed 's/^/read_ahead_kb=/'; } )"
    [ -n "$list" ] || return 0
    dev="$(stat -c '%Hd:%Ld' "$dir")" || { echo "cannot stat $dir"; return 1; }
    while IFS= read -r v; do
        [ -n "$v" ] || continue
        err="$(setting_write "/sys/class/bdi/$dev/${v%%=*}" "${v#*=}")" || { echo "$err"; return 1; }
    done <<<"$list"
}

# ------------------------------------------------------------------ mounts
# The one mounted column: its mount point, the wrapper subshell's PID (it waits
# for the daemon and then writes the daemon's CPU times), the daemon's PID.
MNT="" MNT_WRAP="" MNT_DPID="" MNT_CPUF="" MNT_SEQ=0
LEVER_FAIL=""

# alive PID: the process runs (a zombie has exited).
alive() {
    local st
    st="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    st="${st##*) }"
    [ "${st%% *}" != Z ]
}

kmsfs_bin() { local b; b="$(lever_get "$1" bin | tail -1)"; echo "${b:-$KMSFS}"; }

# The environment of a column's daemon and kmsfs CLI (as env(1) arguments).
col_env() {
    local d="$2"
    echo "KMSFS_KEYSTORE=$d/keystore"
    echo "KMSFS_PASSPHRASE_FILE=$PASS"
    echo "HOME=$d/home"
    echo "CRYFS_FRONTEND=noninteractive"
    echo "CRYFS_NO_UPDATE_CHECK=true"
    lever_get "$1" env
}

# fs_create COL DIR: a fresh, empty volume in DIR/backing (mount point DIR/mnt).
fs_create() {
    local col="$1" d="$2" envs=()
    mkdir -p "$d/backing" "$d/mnt" "$d/home" || return 1
    mapfile -t envs < <(col_env "$col" "$d")
    case "${COL_BASE[$col]}" in
        plain | bindfs | cryfs) ;; # cryfs creates its volume on first mount
        kmsfs) env "${envs[@]}" "$(kmsfs_bin "$col")" init "$d/backing" >"$d/init.log" 2>&1 ;;
        gocryptfs) gocryptfs -init -q -passfile "$PASS" -scryptn 10 "$d/backing" >"$d/init.log" 2>&1 ;;
        securefs) securefs create --pass "$(cat "$PASS")" "$d/backing" >"$d/init.log" 2>&1 ;;
    esac
}

# The directory whose files hold a column's data (for the cold check).
fs_store() { if [ "${COL_BASE[$1]}" = plain ]; then echo "$2/mnt"; else echo "$2/backing"; fi; }

# fs_mount COL DIR: mounts; the daemon runs in the foreground under a wrapper
# subshell, so its PID is known and its CPU times survive its exit.
fs_mount() {
    local col="$1" d="$2" envs=() opts i base="${COL_BASE[$1]}"
    LEVER_FAIL=""
    if [ "$base" = plain ]; then
        MNT="" MNT_WRAP="" MNT_DPID="" MNT_CPUF=""
        LEVER_FAIL="$(levers_after_mount "$col" "$d/mnt")" || return 1
        return 0
    fi
    mapfile -t envs < <(col_env "$col" "$d")
    opts="$(lever_get "$col" opt | paste -sd, -)"
    MNT_SEQ=$((MNT_SEQ + 1))
    MNT="$d/mnt" MNT_CPUF="$d/cpu.$MNT_SEQ" MNT_DPID=""
    rm -f "$d/dpid"
    (
        case "$base" in
            kmsfs) env "${envs[@]}" "$(kmsfs_bin "$col")" mount -f -o "log=$d/daemon.log${opts:+,$opts}" \
                "$d/backing" "$d/mnt" &
                ;;
            bindfs) env "${envs[@]}" bindfs -f --multithreaded ${opts:+-o "$opts"} "$d/backing" "$d/mnt" & ;;
            gocryptfs) env "${envs[@]}" gocryptfs -f -q -passfile "$PASS" "$d/backing" "$d/mnt" & ;;
            cryfs) env "${envs[@]}" cryfs -f "$d/backing" "$d/mnt" <"$PASS" & ;;
            securefs) env "${envs[@]}" securefs mount --pass "$(cat "$PASS")" --log "$d/securefs.log" \
                "$d/backing" "$d/mnt" &
                ;;
        esac
        echo $! >"$d/dpid"
        wait $!
        echo "exit $?" >"$d/daemon.rc"
        times >"$MNT_CPUF"
    ) >>"$d/mount.log" 2>&1 &
    MNT_WRAP=$!
    for ((i = 0; i < 600; i++)); do
        [ -z "$MNT_DPID" ] && [ -s "$d/dpid" ] && MNT_DPID="$(cat "$d/dpid")"
        if [ -n "$MNT_DPID" ] && mountpoint -q "$d/mnt"; then
            LEVER_FAIL="$(levers_after_mount "$col" "$d/mnt")" || return 1
            return 0
        fi
        alive "$MNT_WRAP" || { log "$col: the daemon exited: $(tail -3 "$d/mount.log")"; return 1; }
        sleep 0.1
    done
    log "$col: $d/mnt did not become a mount point in 60 s"
    return 1
}

# fs_unmount COL DIR: unmounts and waits until the daemon has flushed and exited
# (its CPU times are then in MNT_CPUF). For plain: sync.
fs_unmount() {
    local col="$1" d="$2" i
    if [ "${COL_BASE[$col]}" = plain ] || [ -z "$MNT_WRAP" ]; then
        sync
        return 0
    fi
    for ((i = 0; i < 50; i++)); do
        mountpoint -q "$MNT" || break
        fusermount3 -u "$MNT" 2>/dev/null && break
        sleep 0.2
    done
    mountpoint -q "$MNT" && { fusermount3 -uz "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true; }
    for ((i = 0; i < 3000; i++)); do
        alive "$MNT_WRAP" || break
        sleep 0.1
    done
    if alive "$MNT_WRAP"; then
        log "$col: the daemon $MNT_DPID did not exit 300 s after unmount; sending TERM"
        kill -TERM "$MNT_DPID" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            alive "$MNT_WRAP" || break
            sleep 0.1
        done
        alive "$MNT_DPID" && kill -KILL "$MNT_DPID" 2>/dev/null
        wait "$MNT_WRAP" 2>/dev/null || true
        MNT_WRAP="" MNT=""
        return 1
    fi
    wait "$MNT_WRAP" 2>/dev/null || true
    MNT_WRAP="" MNT=""
    grep -q '^exit 0$' "$d/daemon.rc" 2>/dev/null || { log "$col: daemon $(cat "$d/daemon.rc" 2>/dev/null)"; return 1; }
}

# The current daemon's CPU seconds (user + system, all threads): from
# /proc/PID/stat while it runs, from its wrapper's `times` once it has exited.
# Empty for plain.
cpu_now() {
    [ -n "$MNT_DPID" ] || return 0
    local st
    if st="$(cat "/proc/$MNT_DPID/stat" 2>/dev/null)" && [ -n "$MNT_WRAP" ]; then
        st="${st##*) }"
        awk -v t="$CLK_TCK" '{ printf "%.3f", ($12 + $13) / t }' <<<"$st"
    elif [ -s "$MNT_CPUF" ]; then
        sed -n 2p "$MNT_CPUF" | awk '{ n = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); n += a[1] * 60 + a[2] } printf "%.3f", n }'
    fi
}

# cold_frac DIR: "FRACTION KIB": the page-cache-resident pages of the files under
# DIR over their pages (fincore), and the resident KiB.
cold_frac() {
    { find "$1" -type f -print0 2>/dev/null | xargs -0 -r fincore -b -n -r -o PAGES,SIZE 2>/dev/null |
        awk -v ps="$(getconf PAGESIZE)" '{ r += $1; t += int(($2 + ps - 1) / ps) }
            END { printf "%.4f %d\n", (t == 0 ? 0 : r / t), r * ps / 1024 }'; } || true
}

# Unmounts whatever is still mounted and waits for its daemon (exit trap).
fs_cleanup() {
    if [ -n "$MNT_WRAP" ]; then
        fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
        local i
        for ((i = 0; i < 600; i++)); do
            alive "$MNT_WRAP" || break
            sleep 0.1
        done
        if alive "$MNT_WRAP" && [ -n "$MNT_DPID" ]; then
            log "the daemon $MNT_DPID did not exit 60 s after unmount; sending TERM"
            kill -TERM "$MNT_DPID" 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                alive "$MNT_WRAP" || break
                sleep 0.1
            done
            alive "$MNT_DPID" && kill -KILL "$MNT_DPID" 2>/dev/null
        fi
        wait "$MNT_WRAP" 2>/dev/null || true
        MNT_WRAP=""
    fi
    levers_restore
}
