#!/usr/bin/env bash
# PostgreSQL server binaries for tests/test_workers.py (the test runs initdb and its own server in a temporary
# folder; nothing is started here). Idempotent: does nothing where /usr/lib/postgresql/*/bin/initdb exists.
set -euo pipefail

if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "postgres.sh: no apt-get here; install the PostgreSQL server package by hand (the test skips without it)" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
# The Debian package starts a cluster of its own; the test does not use it.
ls /usr/lib/postgresql/*/bin/initdb
