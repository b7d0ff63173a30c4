#!/bin/busybox sh
# gmemd-agent: needs-disk
#
# Guest-side disk benchmark with gmem-io (O_DIRECT, CLOCK_MONOTONIC timing):
# sequential write and read of AGENT_MIB MiB (default 128) in 1 MiB blocks,
# then AGENT_RANDREADS (default 8192) random 4 KiB reads within that range.
# Under TCG the guest CPU dominates these figures; compare backends with them,
# not absolute numbers.
#
# Results (one line each, passed through from gmem-io):
#   GMEMD-RESULT op=seq-write mib=N seconds=S mib_per_s=X
#   GMEMD-RESULT op=seq-read mib=N seconds=S mib_per_s=X
#   GMEMD-RESULT op=rand-read count=N seconds=S iops=X
set -eu

mib=${AGENT_MIB:-128}
reads=${AGENT_RANDREADS:-8192}

gmem-io seq-write /dev/vda "$mib"
gmem-io seq-read /dev/vda "$mib"
# Random reads over the range just written, so every read hits real data.
gmem-io rand-read /dev/vda "$reads" "$mib"
