#!/bin/busybox sh
# gmemd-agent: needs-disk
#
# Conversion workload: `gmem-io convert` (see scripts/guest/gmem-io.c).
# Writes pattern(AGENT_SEED, 0) (default seed 1) to block 0 of /dev/vda, then
# reads it back with O_DIRECT into one locked page, AGENT_PACE_US
# microseconds apart (default 500), while the host turns that page private
# and shared again: reads fail with EIO while it is private, and every read
# that succeeds must return the pattern (or zeroes, when the conversion
# discarded the page between the read's completion and its check).
#
# Progress: GMEMD-PROGRESS convert_pfn=<guest frame of the page>
#           GMEMD-PROGRESS convert_eio=<errors so far>   (at each error)
#           GMEMD-PROGRESS convert_ok=<good reads>       (every 64)
# Result:   GMEMD-RESULT convert_ok=N convert_eio=E convert_zeroed=Z convert_bad=B
set -eu

gmem-io convert /dev/vda "${AGENT_SEED:-1}" "${AGENT_PACE_US:-500}"
