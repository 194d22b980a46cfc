#!/usr/bin/env bash
# check_disk.sh DIR GB WHAT: fail early, with a clear message, when the file
# system that holds DIR (or its nearest existing parent) has less than GB
# gigabytes free. Used by the Makefile before the large steps (the torch venv,
# the release build), so a full disk is not first reported deep inside pip or
# the linker.
set -euo pipefail
dir=$1 need_gb=$2 what=$3
while [ ! -e "$dir" ]; do dir=$(dirname "$dir"); done
free_kb=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
free_gb=$((free_kb / 1024 / 1024))
if [ "$free_gb" -lt "$need_gb" ]; then
  echo "error: $what needs about $need_gb GB free on the disk that holds $(cd "$dir" && pwd), and only $free_gb GB are free." >&2
  echo "       Free some space (old clones, target/ of other checkouts, ~/.cache/pip) and run make again." >&2
  exit 1
fi
