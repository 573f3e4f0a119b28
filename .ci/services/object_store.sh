#!/usr/bin/env bash
# The object-store and shared-tracking-server tests (pytest -m services): moto's S3 server, boto3, PostgreSQL
# (Debian's) behind `mlflow server` with the basic-auth app. Installs only (idempotent); the tests' fixtures
# (tests/services.py) start and stop every service.
set -euo pipefail
cd "$(dirname "$0")/../.."
pip install -q "moto[server]==5.2.5" "boto3==1.44.8" "psycopg2-binary==2.9.13" "Flask-WTF==1.3.0"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi
