#!/usr/bin/env bash
# Builds the Debian package, installs it with dpkg -i, checks what it installs (the
# binary, /sbin/mount.kmsfs, man pages, completions, systemd units, examples), mounts a
# volume through an fstab entry of each type using only the installed files (mount(8)
# with a temporary fstab, `mount -T FILE`; no PATH to target/), writes, reads, umounts,
# then removes the package with dpkg -r and checks that nothing of it is left.
# Run as root (CI runs it after the test suite). Leaves nothing behind: the mounts,
# the package and the temporary files go on any exit.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../../scripts/lib.sh"
cd "$KMSFS_ROOT"
exec </dev/null
[ "$(id -u)" -eq 0 ] || die "test-install.sh installs a package: run it as root"
apt_install fuse3 man-db
need_fuse
t0=$SECONDS

if dpkg-query -W -f='${Status}' kmsfs 2>/dev/null | grep -q 'install ok installed'; then
    die "a kmsfs package is already installed here; remove it first (dpkg -r kmsfs)"
fi
[ ! -e /sbin/mount.kmsfs ] && [ ! -L /sbin/mount.kmsfs ] ||
    die "/sbin/mount.kmsfs exists and is not from the package; remove it first"

deb="$(packaging/debian/build.sh)"
t_build=$((SECONDS - t0))

tmp="$(mktemp -d /tmp/kmsfs-deb-test.XXXXXX)"
installed=""
cleanup() {
    local rc=$?
    for m in "$tmp"/m1 "$tmp"/m2; do
        unmount_wait "$m" 60 || true
    done
    if [ -n "$installed" ]; then
        dpkg -r kmsfs >/dev/null 2>&1 || log "warning: dpkg -r kmsfs failed"
    fi
    rm -rf "$tmp"
    if [ "$rc" -ne 0 ]; then
        log "FAILED (exit $rc)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ok() { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

log "dpkg -i $deb"
dpkg -i "$deb" >/dev/null
installed=1
dpkg-query -W -f='${Status}' kmsfs | grep -q 'install ok installed' || fail "not installed"
mapfile -t files < <(dpkg -L kmsfs)
ok "installed $(basename "$deb") (${#files[@]} paths)"

# Only the installed files from here on: a PATH without target/ (mount(8) itself runs
# helpers without PATH; mount.fuse3 runs kmsfs through sh and its default PATH).
run() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
case "$(run sh -c 'command -v kmsfs')" in
    /usr/bin/kmsfs) ok "kmsfs is /usr/bin/kmsfs: $(run kmsfs --version)" ;;
    *) fail "kmsfs on PATH is $(run sh -c 'command -v kmsfs')" ;;
esac
[ "$(readlink /sbin/mount.kmsfs)" = /usr/bin/kmsfs ] || fail "/sbin/mount.kmsfs is not a link to /usr/bin/kmsfs"
run /sbin/mount.kmsfs --help | grep -q 'mount.kmsfs' || fail "mount.kmsfs --help"
ok "/sbin/mount.kmsfs -> /usr/bin/kmsfs"

for page in kmsfs kmsfs-mount kmsfs-systemd-unit kmsfs-key-create "8 mount.kmsfs"; do
    # shellcheck disable=SC2086
    p="$(run man -w $page)" || fail "man -w $page"
    case "$p" in /usr/share/man/*) ;; *) fail "man -w $page: $p" ;; esac
done
# shellcheck disable=SC2016
run man -P cat 8 mount.kmsfs 2>/dev/null | grep -q 'fuse.kmsfs' || fail "mount.kmsfs(8) does not describe fuse.kmsfs entries"
run man -P cat kmsfs-mount 2>/dev/null | grep -q 'passphrase_file' || fail "kmsfs-mount(1) does not list the options"
ok "man pages: $(printf '%s\n' "${files[@]}" | grep -c '^/usr/share/man/.*\.gz$') ($(run man -w kmsfs))"

for f in /usr/share/bash-completion/completions/kmsfs /usr/share/zsh/vendor-completions/_kmsfs \
    /usr/share/fish/vendor_completions.d/kmsfs.fish; do
    [ -s "$f" ] || fail "missing completion file $f"
done
run bash -c '. /usr/share/bash-completion/completions/kmsfs && complete -p kmsfs' | grep -q 'kmsfs' ||
    fail "the bash completion does not register"
COMP_WORDS=(kmsfs sn) COMP_CWORD=1 run bash -c '. /usr/share/bash-completion/completions/kmsfs
    COMP_WORDS=(kmsfs sn); COMP_CWORD=1; COMP_LINE="kmsfs sn"; COMP_POINT=8
    _kmsfs kmsfs sn kmsfs; printf "%s\n" "${COMPREPLY[@]}"' | grep -qx 'snapshot' ||
    fail "bash completion of 'kmsfs sn' is not snapshot"
ok "completions: bash (kmsfs sn<TAB> -> snapshot), zsh, fish"

for f in /usr/lib/systemd/system/kmsfs-kms.service /usr/lib/systemd/system/kmsfs-kms.socket \
    /usr/share/doc/kmsfs/examples/fstab /usr/share/doc/kmsfs/examples/keystore-layout.md \
    /usr/share/doc/kmsfs/examples/kms-policy.example.toml /usr/share/doc/kmsfs/README.md \
    /usr/share/doc/kmsfs/KMS-DAEMON.md /usr/share/doc/kmsfs/copyright; do
    [ -s "$f" ] || fail "missing $f"
done
if command -v systemd-analyze >/dev/null 2>&1; then
    out="$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify /usr/lib/systemd/system/kmsfs-kms.socket \
        /usr/lib/systemd/system/kmsfs-kms.service 2>&1)" || fail "systemd-analyze verify: $out"
    case "$out" in *kmsfs*) fail "systemd-analyze verify: $out" ;; esac
fi
ok "systemd units (verified), examples and documentation under /usr/share/doc/kmsfs"

# A volume, mounted through fstab entries of both types.
t1=$SECONDS
mkdir -p "$tmp/m1" "$tmp/m2"
(umask 077 && head -c 32 /dev/urandom | base64 >"$tmp/pass")
keys="--keystore $tmp/keystore --passphrase-file $tmp/pass"
# shellcheck disable=SC2086
run kmsfs $keys init "$tmp/vol" >/dev/null
cat >"$tmp/fstab" <<FSTAB
# written by packaging/debian/test-install.sh
$tmp/vol  $tmp/m1  kmsfs       keystore=$tmp/keystore,passphrase_file=$tmp/pass,log=$tmp/m1.log,_netdev,nofail,x-systemd.before=smbd.service  0 0
$tmp/vol  $tmp/m2  fuse.kmsfs  keystore=$tmp/keystore,passphrase_file=$tmp/pass,log=$tmp/m2.log,noauto,nofail  0 0
FSTAB
run mount -T "$tmp/fstab" -a || fail "mount -T fstab -a"
mountpoint -q "$tmp/m1" || fail "$tmp/m1 is not mounted"
mountpoint -q "$tmp/m2" && fail "the noauto entry was mounted"
head -c 3000000 /dev/urandom >"$tmp/data"
cp "$tmp/data" "$tmp/m1/data"
cmp -s "$tmp/data" "$tmp/m1/data" || fail "read back through the kmsfs entry differs"
run umount "$tmp/m1" || fail "umount $tmp/m1"
unmount_wait "$tmp/m1" 60 || fail "the mount daemon of $tmp/m1 did not exit"
ok "fstab type kmsfs (/sbin/mount.kmsfs): mount -a, write, read, umount"

run mount -T "$tmp/fstab" "$tmp/m2" || fail "mount -T fstab $tmp/m2 (fuse.kmsfs)"
mountpoint -q "$tmp/m2" || fail "$tmp/m2 is not mounted"
cmp -s "$tmp/data" "$tmp/m2/data" || fail "read back through the fuse.kmsfs entry differs"
echo second >"$tmp/m2/second"
run umount "$tmp/m2" || fail "umount $tmp/m2"
unmount_wait "$tmp/m2" 60 || fail "the mount daemon of $tmp/m2 did not exit"
# shellcheck disable=SC2086
run kmsfs $keys fsck "$tmp/vol" >/dev/null || fail "fsck after the fstab mounts"
ok "fstab type fuse.kmsfs (mount.fuse3 -> /usr/bin/kmsfs): mount, read, write, umount; fsck clean"
t_mount=$((SECONDS - t1))

log "dpkg -r kmsfs"
dpkg -r kmsfs >/dev/null
installed=""
if dpkg-query -W -f='${Status}' kmsfs 2>/dev/null | grep -q 'installed'; then
    fail "kmsfs still installed: $(dpkg-query -W -f='${Status}' kmsfs)"
fi
[ -z "$(dpkg -L kmsfs 2>/dev/null)" ] || fail "dpkg -L kmsfs still lists files"
left=()
for f in "${files[@]}"; do
    if [ -e "$f" ] || [ -L "$f" ]; then
        # Directories other packages share (/usr/share/man/man1, /sbin on merged /usr) stay.
        if [ -d "$f" ]; then
            case "$f" in */kmsfs | */kmsfs/*) ;; *) continue ;; esac
        fi
        left+=("$f")
    fi
done
[ "${#left[@]}" -eq 0 ] || fail "left after dpkg -r: ${left[*]}"
[ ! -e /sbin/mount.kmsfs ] && [ ! -L /sbin/mount.kmsfs ] || fail "/sbin/mount.kmsfs is left"
ok "dpkg -r kmsfs: nothing left (${#files[@]} paths checked, /sbin/mount.kmsfs gone)"
printf 'package test: build %ds, mounts %ds, total %ds\n' "$t_build" "$t_mount" "$((SECONDS - t0))"
