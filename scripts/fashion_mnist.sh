#!/usr/bin/env bash
# Installs Debian's dataset-fashion-mnist (the original IDX files, offline) when missing and possible (root + apt).
# Without it, the demo falls back to keras.datasets (a download) and the real-data tests skip with a reason.
[ -d /usr/share/datasets/fashion-mnist ] && exit 0
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || exit 0
apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 && exit 0
{ apt-get update -q && apt-get install -y -q dataset-fashion-mnist; } >/dev/null 2>&1 || true
