#!/bin/busybox sh
# Does nothing but stay up: for tests that restart or reconnect the backend
# underneath a running guest.
#
# Result:  GMEMD-RESULT ready=1   (then sleeps forever)
echo "GMEMD-RESULT ready=1"
while :; do sleep 3600; done
