#!/bin/bash
# The whole experiment on a SLURM cluster, each job starting when the ones it needs are done:
#   bash scripts/cluster/submit.sh                  # from the repository root
#   EXP=runs/coco-2 bash scripts/cluster/submit.sh  # the variables of common.sh pass through
set -euo pipefail
shared=$(sbatch --parsable scripts/cluster/shared.sbatch)
target=$(sbatch --parsable --dependency="afterok:$shared" scripts/cluster/target.sbatch)
shadows=$(sbatch --parsable --dependency="afterok:$shared" scripts/cluster/shadows.sbatch)
attack=$(sbatch --parsable --dependency="afterok:$target:$shadows" scripts/cluster/attack.sbatch)
echo "submitted: shared $shared, target $target, shadows $shadows (array), attack $attack"
