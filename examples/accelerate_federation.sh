#!/usr/bin/env bash
# The same federation under `accelerate launch`: the round's clients are split across processes
# (one per GPU, or CPU processes over gloo when there is none); every rank replays the same
# aggregate, so the result equals the single-process run bit for bit.
#
#   examples/accelerate_federation.sh                                    # 2 processes, the embedded default job
#   NUM_PROCESSES=4 examples/accelerate_federation.sh --config examples/configs/tweets_smollm2.yaml
#   examples/accelerate_federation.sh --model Qwen/Qwen2.5-0.5B-Instruct --set rounds=20   # any model, online
#
# Every argument goes to `meerkat-hf federate` (see `meerkat-hf federate --help`).
set -euo pipefail
NUM_PROCESSES="${NUM_PROCESSES:-2}"
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-29500}"
# `--multi_gpu` selects accelerate's torchrun launcher; with no visible GPU the ranks are CPU
# processes over gloo (a plain `--cpu` launch would start a single process).
exec accelerate launch --multi_gpu --num_processes "$NUM_PROCESSES" --num_machines 1 \
    --mixed_precision no --dynamo_backend no --main_process_port "$MAIN_PROCESS_PORT" \
    -m meerkat_hf.federated "$@"
