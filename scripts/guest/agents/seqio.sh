#!/bin/busybox sh
# gmemd-agent: needs-disk
#
# Live-migration workload: `gmem-io seqio` (see scripts/guest/gmem-io.c).
# Writes AGENT_BLOCKS 4 KiB blocks (default 16384, i.e. 64 MiB) of a pattern
# derived from AGENT_SEED (default 1) to the start of /dev/vda, one at a time
# with O_DIRECT, reading each straight back into its own slot of a guest RAM
# buffer the device writes (DMA), sleeping AGENT_PACE_US microseconds
# (default 0) after each block. Block i goes to slot (i * AGENT_STRIDE) mod
# AGENT_BLOCKS (default stride 1; any stride coprime to the block count; a
# large one scatters the device's writes over guest RAM). At the end it checks every slot in RAM and
# the checksum of the disk against the running checksum of what it wrote.
# AGENT_PROGRESS_EVERY (default 256) sets how many blocks go between progress
# lines; a small value lets the host time the guest's I/O stalls from the
# console.
# The host mirrors the pattern in gmem_tests::seqio to check the image.
#
# Needs AGENT_BLOCKS * 4 KiB of disk and as much free guest RAM.
#
# Progress: GMEMD-PROGRESS seqio=<blocks done>   (every AGENT_PROGRESS_EVERY blocks)
# Result:   GMEMD-RESULT seqio_blocks=N seqio_bad_slots=X seqio_first_bad_slot=K|none
#                        seqio_sum=<hex16> seqio_disk_sum=<hex16> seqio_max_op_us=M
set -eu

gmem-io seqio /dev/vda "${AGENT_BLOCKS:-16384}" "${AGENT_SEED:-1}" "${AGENT_PACE_US:-0}" "${AGENT_STRIDE:-1}" \
    "${AGENT_PROGRESS_EVERY:-256}"
