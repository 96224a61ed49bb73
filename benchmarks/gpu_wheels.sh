#!/usr/bin/env bash
# Download, here, the wheels foldsweep needs on the GPU machine and that its image lacks, into .whl/
# (git-ignored); gpu_check.sh installs them there with pip --no-index. The device machine (nvidia-h200)
# runs Python 3.12 on x86-64 and reaches no registry; the working tree plus carried paths must fit in
# 64 MiB. Then prove the set complete (benchmarks/gpu_wheels.py: declared requirements, and a tiny
# tracked sweep with every other import refused) and print the sizes.
#
#   bash benchmarks/gpu_wheels.sh          # PYTHON=... to use another interpreter's pip (default .venv/bin/python)
#
# Versions are the ones foldsweep's tests run on here. MLflow travels as mlflow-skinny (+ mlflow-tracing):
# the tracking client and its SQLite store without the UI and server (full mlflow is 12 MB more, plus Flask,
# graphene, gunicorn, docker, skops...), which a sweep never imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=.whl
WHEELS=(
  optuna==5.0.0 alembic==1.20.1 mako==1.4.3 colorlog==6.12.0 sqlalchemy==2.1.9
  mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 sqlparse==0.6.1 python-dotenv==1.2.2 cachetools==7.3.3
  importlib-metadata==9.1.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  fastapi==0.165.0 starlette==1.10.0 databricks-sdk==0.162.0
  cryptography==48.0.0 cffi==2.0.0 pycparser==3.0
  protobuf==7.36.2
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0
)
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}" 2> >(grep -v "is ignored" >&2)
"$PY" benchmarks/gpu_wheels.py "$DEST"
tree_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
wheel_bytes=$(du -sb "$DEST" | cut -f1)
echo "wheels: $(ls "$DEST" | wc -l) files, $((wheel_bytes / 1024)) KiB; working tree: $((tree_bytes / 1024)) KiB;" \
  "together $(((wheel_bytes + tree_bytes) / 1048576)) MiB of the 64 MiB a device call may carry"
