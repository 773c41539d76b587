#!/usr/bin/env bash
# The test command of the README and of CI (.ci/run calls it after scripts/setup.sh):
#   1. pinned   the whole suite on the pinned set (scripts/constraints-pinned.txt), in the current python
#   2. newest   the whole suite on the newest releases (scripts/constraints-newest.txt, refreshed by
#               scripts/refresh_newest.sh), in .venv-newest, built or brought up to date here
#   3. wheel    the wheel users install, built and installed into a clean venv (.venv-wheel: the pinned set's
#               packages seen through --system-site-packages, deltatune itself from the wheel); runs `deltatune info`
# `bash scripts/test.sh pinned` (or newest, wheel) runs one stage; NEWEST_TESTS="tests/test_x.py ..." narrows
# stage 2 to a named subset. Stages stop at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stages=${*:-pinned newest wheel}

pinned() {
    echo "== pinned set: $($PY -c 'import transformers, peft; print(f"transformers {transformers.__version__}, peft {peft.__version__}")')"
    $PY -m pytest -q
}

newest() {
    [ -x .venv-newest/bin/python ] || $PY -m venv .venv-newest
    CONSTRAINTS=scripts/constraints-newest.txt PYTHON=.venv-newest/bin/python bash scripts/setup.sh
    echo "== newest set (scripts/constraints-newest.txt)"
    # shellcheck disable=SC2086
    .venv-newest/bin/python -m pytest -q ${NEWEST_TESTS:-}
}

wheel() {
    rm -rf dist/deltatune-*.whl
    $PY -m pip wheel -q --no-deps --no-build-isolation -w dist .
    [ -x .venv-wheel/bin/python ] || $PY -m venv --system-site-packages .venv-wheel
    .venv-wheel/bin/python -m pip install -q --no-deps --force-reinstall dist/deltatune-*.whl
    (
        cd /  # nothing of the source tree on the path: the installed wheel alone
        where=$("$OLDPWD/.venv-wheel/bin/python" -c 'import deltatune; print(deltatune.__file__)' 2>/dev/null || true)
        case "$where" in */.venv-wheel/*) ;; *) echo "the wheel's deltatune is not the one imported ($where)" >&2; exit 1;; esac
    )
    echo "== the wheel, installed in .venv-wheel"
    (cd / && "$OLDPWD/.venv-wheel/bin/deltatune" info)
    .venv-wheel/bin/python -c 'import importlib.resources as r; assert r.files("deltatune").joinpath("demo_data/train.jsonl").is_file(), "demo data missing from the wheel"'
}

for stage in $stages; do
    case $stage in
        pinned|newest|wheel) $stage ;;
        *) echo "scripts/test.sh: unknown stage '$stage' (pinned, newest, wheel)" >&2; exit 2 ;;
    esac
done
