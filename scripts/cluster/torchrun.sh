#!/bin/bash
# The target on several nodes without SLURM, through torchrun (Lightning's TorchElasticEnvironment
# reads the ranks it sets). Run the same line on every node, NODE_RANK 0 on the one at MASTER_ADDR:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash scripts/cluster/torchrun.sh   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash scripts/cluster/torchrun.sh   # on node1
# INDEX=K trains shadow K instead; the other variables are those of common.sh.
set -euo pipefail
source scripts/cluster/common.sh
NNODES=${NNODES:-1}
INDEX=${INDEX:-0}
role=$([ "$INDEX" = 0 ] && echo target || echo shadow)
run=$(printf '%s/%s-%s-%03d' "$EXP" "$FAMILY" "$role" "$INDEX")

torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS" --node-rank "${NODE_RANK:-0}" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    train.py fit --config "$MODEL" --data.experiment "$EXP" \
    --model.init_args.autoencoder "$EXP/autoencoder" --data.model_index "$INDEX" \
    --trainer.devices "$GPUS" --trainer.num_nodes "$NNODES" --ckpt_path "$(ckpt_path "$run")"
