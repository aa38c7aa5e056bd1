#!/usr/bin/env bash
# Fetches the default corpus (Debian python3.11-doc sources; fallbacks in mor/data/corpus.py)
# into ${MOR_DATA_DIR:-~/.cache/mor}/corpus/default. Idempotent; extra args go to the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m mor.data.corpus "$@"
