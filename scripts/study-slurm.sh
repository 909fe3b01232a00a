#!/usr/bin/env bash
# The stability study at the reference's scale (issue 30), spread over a GPU cluster: 7 arms x
# depths 6 and 8 x 15 seeds = 210 runs of 50 epochs at N 64, width 32, max_channels 512
# (configs/study-deep.toml). Each Slurm task takes one shard of the runs on one GPU; all tasks
# share one sweep directory on a shared file system, each run is trained once, and any task
# writes the report of every run ended so far. Submitting again continues: ended runs are kept,
# a run that was killed resumes from its checkpoint.
#
#   as a job array, one GPU per task (16 tasks here):
#     sbatch --array=0-15 --gpus=1 --time=24:00:00 scripts/study-slurm.sh [OUT]
#   as one job, one task per GPU on 2 nodes of 8:
#     sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-task=1 --time=24:00:00 scripts/study-slurm.sh [OUT]
#   the runs and the device-hours first, without training (STEP_MS from `fnokern bench-step
#   --config configs/study-deep.toml --device cuda` at depth 6 and 8 on the target GPU):
#     DRY_RUN=1 STEP_MS=6=100,8=120 scripts/study-slurm.sh
#
# Run (and submit) it from the repository root. FNOKERN names the binary (default: fnokern on PATH).
#SBATCH --job-name=fnokern-study
#SBATCH --output=fnokern-study-%A_%a.log
set -euo pipefail

out=${1:-sweeps/study}
fnokern=${FNOKERN:-fnokern}
arms=control,guard,layerscale,agc,prenorm,warmup_cosine,constant_width32
study=("$fnokern" shootout --config configs/study-deep.toml --depths 6,8 --arms "$arms" --seeds 15 --device cuda --out "$out")

if [[ -n "${DRY_RUN:-}" ]]; then
    if [[ -n "${STEP_MS:-}" ]]; then
        exec "${study[@]}" --dry-run --step-ms "$STEP_MS"
    fi
    exec "${study[@]}" --dry-run
fi

if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    shard="$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"
elif [[ -n "${FNOKERN_STUDY_TASK:-}" ]]; then
    shard="$SLURM_PROCID/$SLURM_NTASKS"
elif [[ -n "${SLURM_NTASKS:-}" ]]; then
    # The batch script itself: start one task per GPU, each running this script.
    FNOKERN_STUDY_TASK=1 exec srun --export=ALL "$0" "$@"
else
    shard="0/1"
fi
exec "${study[@]}" --shard "$shard"
