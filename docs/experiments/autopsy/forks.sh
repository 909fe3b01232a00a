#!/usr/bin/env bash
# The autopsy's follow-up (docs/experiments/autopsy/README.md): a control run of
# docs/experiments/control-cpu that explodes, forked from an epoch-end checkpoint before its
# explosion and trained 3 more epochs under each change the autopsy points to, each with the run's
# own batch order (train.seed = the run's seed: the control fork is the run itself, bit for bit)
# and three others. Resumable: run it again and ended forks are kept, an interrupted one
# continues. Then: python3 docs/experiments/autopsy/forks.py
#
#   bash docs/experiments/autopsy/forks.sh control-d8-s2 23   # explodes at step 3051, epoch 24
#   bash docs/experiments/autopsy/forks.sh control-d8-s5 12   # explodes at step 1593, epoch 13
# (from the repository root; about 90 s a fork alone on 2 cores)
set -euo pipefail
FNOKERN=${FNOKERN:-target/release/fnokern}
name=${1:?the control run, e.g. control-d8-s2}
epoch=${2:?the epoch whose end the forks start from}
run=docs/experiments/control-cpu/runs/$name
seed=$(awk '/^\[/{t=($0=="[train]")} t&&/^seed = /{print $3}' "$run/config.toml")
here=docs/experiments/autopsy/forks/$name
source=$here/source
ck=$source/checkpoints/epoch_$epoch.safetensors
if [[ ! -f $ck ]]; then
    # The run again, keeping every epoch's checkpoint, to that epoch.
    "$FNOKERN" train --config "$run/config.toml" --set train.checkpoint_every=1 --stop-after-epochs "$epoch" --out "$source"
fi
declare -A arms=(
    [control]=""
    [beta2_0.99]="--set train.beta2=0.99"
    [eps_1e-6]="--set train.adam_eps=1e-6"
    [lr_5e-4]="--set train.lr=5e-4"
    [agc_0.1]="--set train.clip=agc_unit --set train.agc_factor=0.1 --set train.agc_eps=1e-3"
)
for order in "$seed" 11 12 13; do
    for arm in control beta2_0.99 eps_1e-6 lr_5e-4 agc_0.1; do
        out=$here/$arm-s$order
        if [[ -f $out/summary.json ]] && grep -q '"finished": true' "$out/summary.json"; then continue; fi
        # shellcheck disable=SC2086
        common=(--config "$run/config.toml" --set train.epochs=$((epoch + 3)) --set train.seed="$order" --set train.evaluate=false ${arms[$arm]})
        echo "== $name from epoch $epoch: $arm, batch order $order"
        if [[ -f $out/config.toml ]]; then
            "$FNOKERN" train --resume --out "$out" "${common[@]}" || true
        else
            "$FNOKERN" train --fork "$ck" --out "$out" "${common[@]}" || true
        fi
    done
done
