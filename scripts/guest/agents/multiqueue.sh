#!/bin/busybox sh
# gmemd-agent: needs-disk
#
# Exercises every virtqueue at once: one worker per online CPU, pinned with
# taskset (blk-mq maps each CPU to its own virtqueue when the device has
# num-queues >= CPUs), each writing 8 MiB of random data to its own slice of
# /dev/vda with O_DIRECT and reading it back, compared by SHA-256.
#
# Result:  GMEMD-RESULT cpus=<n> queues=<n> queues_used=<n|unknown> slices_ok=<n> slices_failed=<n>
set -eu -o pipefail

dev=/dev/vda
slice_mib=8
work=/tmp/multiqueue
mkdir -p "$work"

# Online CPU ids from the kernel's list syntax, e.g. "0-3,6".
cpus=
for range in $(tr ',' ' ' </sys/devices/system/cpu/online); do
    cpus="$cpus $(seq "${range%-*}" "${range#*-}")"
done
ncpu=$(echo $cpus | wc -w)

size=$(blockdev --getsize64 "$dev")
if [ "$size" -lt $((ncpu * slice_mib * 1048576)) ]; then
    echo "multiqueue: $dev has $size bytes, need $((ncpu * slice_mib)) MiB" >&2
    exit 1
fi

# Completion interrupts per virtqueue ("virtio0-req.N" MSI-X vectors in
# /proc/interrupts, summed over CPUs), to check that the workers really spread
# over the queues; blk-mq debugfs has no per-queue counters any more. Empty
# without MSI-X, where all queues share one interrupt line.
vdev=$(basename "$(readlink -f /sys/block/vda/device)")
queue_irqs() {
    awk -v pat="^$vdev-req[.][0-9]+\$" '$NF ~ pat {
        n = 0
        for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i
        print n
    }' /proc/interrupts
}
before=$(queue_irqs)

# One worker: runs in the background, leaves "ok" or "failed" in its status file.
worker() {
    cpu=$1 slot=$2
    data=$work/$slot.bin
    st=failed
    if dd if=/dev/urandom of="$data" bs=1M count=$slice_mib iflag=fullblock status=none &&
        want=$(sha256sum <"$data" | cut -d' ' -f1) &&
        taskset -c "$cpu" dd if="$data" of="$dev" bs=1M count=$slice_mib \
            seek=$((slot * slice_mib)) oflag=direct conv=fsync,notrunc status=none &&
        got=$(taskset -c "$cpu" dd if="$dev" bs=1M count=$slice_mib \
            skip=$((slot * slice_mib)) iflag=direct status=none | sha256sum | cut -d' ' -f1); then
        if [ "$want" = "$got" ]; then
            st=ok
        else
            echo "multiqueue: slice $slot (cpu $cpu) read back $got, wrote $want" >&2
        fi
    else
        echo "multiqueue: slice $slot (cpu $cpu): I/O error" >&2
    fi
    rm -f "$data"
    echo "$st" >"$work/$slot.status"
}

slot=0
for cpu in $cpus; do
    worker "$cpu" "$slot" &
    slot=$((slot + 1))
done
wait

ok=0 failed=0
slot=0
while [ "$slot" -lt "$ncpu" ]; do
    if [ "$(cat "$work/$slot.status" 2>/dev/null)" = ok ]; then
        ok=$((ok + 1))
    else
        failed=$((failed + 1))
    fi
    slot=$((slot + 1))
done
# Hardware queues blk-mq set up for the disk (with num-queues below the CPU
# count several CPUs share one), and how many of them carried our requests.
queues=$(ls /sys/block/vda/mq | wc -l)
used=unknown
after=$(queue_irqs)
if [ -n "$before" ] && [ -n "$after" ]; then
    used=0
    set -- $after
    for b in $before; do
        [ "$1" -gt "$b" ] && used=$((used + 1))
        shift
    done
fi
echo "GMEMD-RESULT cpus=$ncpu queues=$queues queues_used=$used slices_ok=$ok slices_failed=$failed"
[ "$failed" -eq 0 ]
