#!/usr/bin/env bash
# Wheels structured output needs on the GPU machine (Python 3.12, no internet, no pydantic):
# run here, then carry .whl/ (gitignored) and install there with
#   pip install --no-index --no-deps .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
get() { pip download --no-deps --only-binary=:all: --python-version 3.12 --platform "$1" -d .whl "${@:2}"; }
get manylinux_2_28_x86_64 xgrammar==0.2.9 apache-tvm-ffi jsonschema jsonschema-specifications referencing attrs \
    pydantic==2.14.4 annotated-types typing-inspection typing-extensions
get manylinux_2_17_x86_64 rpds-py pydantic-core==2.50.5  # pydantic 2.14.4 pins this core
ls -la .whl
