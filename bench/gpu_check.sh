#!/usr/bin/env bash
# Every GPU check of hpcllm in one run, for a machine with CUDA and no network: the `device` machine (one H200,
# python3 3.12 with a CUDA torch and most of hpcllm's dependencies, no MPI launcher seen; docs/gpu-checks.md). What it
# lacks comes as wheels that `make gpu-wheels` downloads here into .whl/ (MPICH among them, unpacked beside them).
#
#   here:   make gpu-wheels
#   there:  bash bench/gpu_check.sh        (device tool: carry [".whl"], timeout_s 590)
#
# Steps, each under its own time limit so that one stuck step still leaves the others' results:
#   1. the gpu-marked tests: loader CUDA path (pinned ring, side stream, device_map, a model larger than the staging
#      ring, DRAM tier -> GPU, checksum on the GPU path), host-to-device probe, GPU worker greedy == generate, a GPU
#      instance through the node agent (fresh worker and spare worker);
#   2. tensor parallelism over NCCL (bench/tp_gpu_check.py): 2 MPI ranks on cuda:0 and cuda:1 load the small dev
#      Llama through hpcllm.tp and decode greedily, tokens == generate; with one GPU, 1 rank (NCCL with world size
#      1), saying so; fails, saying what to carry, without mpi4py or an MPI launcher;
#   3. bench/load.py's GPU methods against the host-to-device limit measured in the same run (~2 GB checkpoint);
#   4. hpcllm's engine on the GPU (bench/engine_gpu.py --cuda-graphs): continuous batching, eager and with decode
#      steps replayed from CUDA graphs, against transformers' static-batch generate at 1, 16 and 64 requests
#      arriving together, on the load bench's ~2 GB bf16 Llama;
#   5. cudaHostRegister of a tmpfs file against the DRAM tier's staged path (bench/host_register.py): can the tier
#      feed the GPU at host-to-device speed, and must the registration happen ahead of a load;
#   6. vLLM's CUDA path behind hpcllm (bench/vllm_gpu_check.py): weights through hpcllm's loader plugin, greedy ==
#      generate on cuda, throughput at 1 and 16 prompts; skipped, saying so, when the interpreter has no vllm.
# GPU_CHECK_STEPS picks steps (default: "tests tp load engine register vllm"); BENCH_ARGS / ENGINE_ARGS add arguments
# to the load and engine benches (e.g. ENGINE_ARGS="--profile --concurrency 1"), BENCH_METHODS replaces the load
# bench's method list.
# Results in $OUT (the device tool's folder) or bench/results/gpu-check/: gpu.txt, gpu-tests.log, tp.txt, load.txt,
# load-latest.json/.png, engine.txt, register.txt and vllm.txt. Exit status: the tests', else the TP check's, else
# the vLLM check's (0 for a step not run).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
wheels=()
for wheel in .whl/*.whl; do
    [[ -e $wheel && $wheel != .whl/mpich-* ]] && wheels+=("$wheel")
done
if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hpcllm-site \
        "${wheels[@]}" || { echo "error: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/hpcllm-site:$PWD
fi
# MPICH's wheel holds mpiexec and libmpi as data files, which `pip install --target` drops: unpack it instead and
# point mpi4py at its library.
for wheel in .whl/mpich-*.whl; do
    [ -e "$wheel" ] || continue
    rm -rf /tmp/hpcllm-mpich
    "$PY" -m zipfile -e "$wheel" /tmp/hpcllm-mpich || { echo "error: unpacking $wheel failed" >&2; exit 1; }
    mpich=$(echo /tmp/hpcllm-mpich/mpich-*.data/data)
    chmod +x "$mpich"/bin/*
    export PATH=$mpich/bin:$PATH MPI4PY_LIBMPI=$mpich/lib/libmpi.so.12
done

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "CUDA", torch.version.cuda,
"available", torch.cuda.is_available(), "| transformers", transformers.__version__)'; } | tee "$OUT/gpu.txt"

steps=" ${GPU_CHECK_STEPS:-tests tp load engine register vllm} "
want() { [[ $steps == *" $1 "* ]]; }
tests=0 tp=0 vllm=0

if want tests; then
    timeout "${TEST_SECONDS:-110}" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider hpcllm/store hpcllm/worker \
        hpcllm/node 2>&1 | tee "$OUT/gpu-tests.log"
    tests=${PIPESTATUS[0]}
fi

if want tp; then
    # The MPI launch gets the step's limit less a margin, so that a hung rank is reported by the check itself.
    tp_seconds=${TP_SECONDS:-60}
    timeout "$tp_seconds" "$PY" bench/tp_gpu_check.py --timeout $((tp_seconds - 30)) 2>&1 | tee "$OUT/tp.txt"
    tp=${PIPESTATUS[0]}
fi

if want load; then
    # BENCH_ARGS: extra bench/load.py arguments, split on spaces.
    read -r -a bench_args <<<"${BENCH_ARGS:-}"
    methods=${BENCH_METHODS:-hpcllm_gpu_disk,hpcllm_gpu_dram,safetensors_gpu,from_pretrained_gpu,hpcllm_gpu_disk_sweep,hpcllm_gpu_dram_2threads}
    timeout "${BENCH_SECONDS:-200}" "$PY" bench/load.py --runs "${BENCH_RUNS:-1}" --workdir /tmp/hpcllm-bench \
        "${bench_args[@]}" --methods "$methods" 2>&1 | tee "$OUT/load.txt"
    cp bench/results/load-latest.json bench/results/load-latest.png "$OUT/" 2>/dev/null
fi

if want engine; then
    bench_model=/tmp/hpcllm-bench/bench/hf
    [ -f "$bench_model/config.json" ] || bench_model=  # the load bench did not build it: the small dev Llama
    read -r -a engine_args <<<"${ENGINE_ARGS:-}"
    timeout "${ENGINE_SECONDS:-180}" "$PY" bench/engine_gpu.py --cuda-graphs ${bench_model:+--model-dir "$bench_model"} \
        "${engine_args[@]}" 2>&1 | tee "$OUT/engine.txt"
fi

if want register; then
    timeout "${REGISTER_SECONDS:-60}" "$PY" bench/host_register.py 2>&1 | tee "$OUT/register.txt"
fi

if want vllm; then
    timeout "${VLLM_SECONDS:-240}" "$PY" bench/vllm_gpu_check.py 2>&1 | tee "$OUT/vllm.txt"
    vllm=${PIPESTATUS[0]}
fi
echo "gpu_check: steps${steps% }: tests exit status $tests, TP check $tp, vLLM check $vllm; results in $OUT"
[ "$tests" -ne 0 ] && exit "$tests"
[ "$tp" -ne 0 ] && exit "$tp"
exit "$vllm"
