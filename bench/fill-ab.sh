#!/bin/bash
# usage: bench/fill-ab.sh KMSFS_BIN WAIT_S [MOUNT_OPTS] (root): fio layout + 10 s 4 KiB randwrite on a
# fresh volume, WAIT_S seconds mounted, unmount, drop caches, mount, 10 s cold 4 KiB randread;
# prints IOPS and daemon CPU-µs per read. Alternate e.g. "BIN 0" and "BIN 0 noblockfill".
set -u
bin=$1; wait_s=$2; opts=${3:-}
R=$(mktemp -d /var/tmp/ffr.XXXXXX); echo pass-ab-123456 > $R/pass; chmod 600 $R/pass
d=$R/v; mkdir -p $d/backing $d/mnt $d/home
export KMSFS_KEYSTORE=$d/keystore KMSFS_PASSPHRASE_FILE=$R/pass HOME=$d/home
tk=$(getconf CLK_TCK)
$bin init $d/backing >/dev/null 2>&1 || { echo init failed; exit 1; }
mnt() { $bin mount -f ${opts:+-o $opts} $d/backing $d/mnt >>$d/log 2>&1 & pid=$!; for i in $(seq 100); do mountpoint -q $d/mnt && break; sleep 0.1; done; }
mnt
fio --name=layout --filename=$d/mnt/fio.dat --size=256M --bs=1M --rw=write --end_fsync=1 --minimal >/dev/null
w=$(fio --filename=$d/mnt/fio.dat --size=256M --bs=4k --ioengine=psync --direct=0 --runtime=10 --time_based --minimal --name=randwrite --rw=randwrite --end_fsync=1 | cut -d';' -f49)
sleep $wait_s
$bin umount $d/mnt >/dev/null 2>&1; wait $pid
sync; echo 3 > /proc/sys/vm/drop_caches
mnt
c0=$(awk '{print $14+$15}' /proc/$pid/stat)
out=$(fio --filename=$d/mnt/fio.dat --size=256M --bs=4k --ioengine=psync --direct=0 --runtime=10 --time_based --minimal --name=randread --rw=randread)
c1=$(awk '{print $14+$15}' /proc/$pid/stat)
n=$(cut -d';' -f6 <<<"$out"); n=$((n/4))
echo "$(basename $bin) ${opts:-default} wait=$wait_s: randwrite iops $w | cold randread iops $(cut -d';' -f8 <<<"$out") cpu_us/op $(echo "scale=1;($c1-$c0)/$tk*1000000/$n"|bc)"
$bin umount $d/mnt >/dev/null 2>&1; wait $pid
grep -i "merge" $d/log | tail -2
rm -rf $R
