#!/usr/bin/env bash
# Installs the pinned Python packages and fetches the default corpus (once; cached).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q --disable-pip-version-check -r requirements.txt
python3 -m mor.data.corpus
