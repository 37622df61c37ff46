#!/usr/bin/env bash
# Stands in for `apptainer exec [--nv] [--bind B]... IMAGE CMD...` in tests: logs the call, runs CMD on the host
# (python3 -> $FAKE_APPTAINER_PYTHON), and returns its exit code. Signals reach CMD because it is exec'd.
echo "$*" >> "$FAKE_APPTAINER_LOG"
[ "$1" = exec ] || exit 90
shift
while [ $# -gt 0 ]; do case "$1" in --nv) shift ;; --bind) shift 2 ;; *) break ;; esac; done
shift   # the image
if [ "$1" = python3 ]; then shift; exec "$FAKE_APPTAINER_PYTHON" "$@"; fi
exec "$@"
