#!/bin/busybox sh
# Puts a known pattern into guest RAM so the host can find it in the RAM memfd
# gmemd owns (after killing QEMU).
#
# AGENT_TOKEN is a hex string; 8 MiB of a tmpfs file (tmpfs pages are guest
# RAM) are filled with its ASCII text repeated back to back. Search the memfd
# for the token written twice in a row: the kernel command line holds it only
# once, so a match proves the file's pages made it.
#
# Result:  GMEMD-RESULT ram_token=written   (then sleeps forever)
set -eu

token=${AGENT_TOKEN:-}
case "$token" in
'' | *[!0-9a-fA-F]*)
    echo "ram-token: AGENT_TOKEN must be a non-empty hex string, got '$token'" >&2
    exit 2
    ;;
esac

size=$((8 * 1048576))
f=/tmp/ram-token
# Double the file until it is big enough, then cut to exactly 8 MiB: a few
# dozen cat calls instead of a million printf ones.
printf %s "$token" >"$f.tmp"
while [ "$(stat -c %s "$f.tmp")" -lt "$size" ]; do
    cat "$f.tmp" "$f.tmp" >"$f.2"
    mv "$f.2" "$f.tmp"
done
head -c "$size" "$f.tmp" >"$f"
rm -f "$f.tmp"

echo "GMEMD-RESULT ram_token=written"
sync
# Keep the file (and this guest) alive until the host kills QEMU.
while :; do sleep 3600; done
