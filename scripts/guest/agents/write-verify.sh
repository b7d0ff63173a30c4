#!/bin/busybox sh
# gmemd-agent: needs-disk
#
# Data-integrity check of the disk: AGENT_MIB MiB (default 32) of random data
# are written to the start of /dev/vda with O_DIRECT, read back with O_DIRECT
# and compared by SHA-256. O_DIRECT on both sides means the read really comes
# from the device, not from the guest page cache.
#
# Then, if the device advertises discard, the MiB after the data is filled,
# discarded and read back: it must come back as zeros (gmemd drops the backing
# pages on discard). The virtio spec does not promise zeros after a discard
# (QEMU's own -drive default, discard=ignore, reports "fail" here), so a
# discard failure is left for the host to judge: the exit status only reflects
# the data comparison and I/O errors.
#
# Results:  GMEMD-RESULT written_sha256=<hex> readback_sha256=<hex> mib=<n> match=<yes|no>
#           GMEMD-RESULT discard=ok|skipped|fail
set -eu -o pipefail

mib=${AGENT_MIB:-32}
dev=/dev/vda
data=/tmp/write-verify.bin
MiB=1048576

size=$(blockdev --getsize64 "$dev")
# The data plus one MiB for the discard check.
if [ "$size" -lt $(((mib + 1) * MiB)) ]; then
    echo "write-verify: $dev has $size bytes, need $(((mib + 1) * MiB))" >&2
    exit 1
fi

# fullblock: a read from /dev/urandom may legally return less than 1 MiB.
dd if=/dev/urandom of="$data" bs=1M count="$mib" iflag=fullblock status=none
written=$(sha256sum <"$data" | cut -d' ' -f1)
dd if="$data" of="$dev" bs=1M count="$mib" oflag=direct conv=fsync,notrunc status=none
readback=$(dd if="$dev" bs=1M count="$mib" iflag=direct status=none | sha256sum | cut -d' ' -f1)
rm -f "$data"
sync

match=no
[ "$written" = "$readback" ] && match=yes
echo "GMEMD-RESULT written_sha256=$written readback_sha256=$readback mib=$mib match=$match"

# Discard check. "skipped" when busybox lacks blkdiscard or the device does not
# offer discard (discard_max_bytes is 0 without VIRTIO_BLK_F_DISCARD).
discard=skipped
max=$(cat /sys/block/vda/queue/discard_max_bytes 2>/dev/null || echo 0)
if command -v blkdiscard >/dev/null && [ "$max" -gt 0 ]; then
    discard=fail
    zeros=$(dd if=/dev/zero bs=1M count=1 status=none | sha256sum | cut -d' ' -f1)
    # Fill the range first: on a fresh sparse disk it would read as zeros
    # even if the discard did nothing.
    dd if=/dev/urandom of="$dev" bs=1M count=1 seek="$mib" iflag=fullblock \
        oflag=direct conv=fsync,notrunc status=none
    if blkdiscard -o $((mib * MiB)) -l $MiB "$dev"; then
        after=$(dd if="$dev" bs=1M count=1 skip="$mib" iflag=direct status=none |
            sha256sum | cut -d' ' -f1)
        if [ "$after" = "$zeros" ]; then
            discard=ok
        else
            echo "write-verify: discarded MiB $mib does not read back as zeros" >&2
        fi
    else
        echo "write-verify: blkdiscard failed" >&2
    fi
fi
echo "GMEMD-RESULT discard=$discard"

[ "$match" = yes ]
