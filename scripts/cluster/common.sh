# Shared by the sbatch scripts of this folder (sourced, not run). Edit the variables here or set
# them when submitting: `EXP=runs/cc3m MODEL=configs/seq2seq/dalle-mini.yaml sbatch ...`.
EXP=${EXP:-runs/coco}                                 # experiment folder (splits, runs, report)
AUTOENCODER=${AUTOENCODER:-configs/autoencoder/kl-f8-256.yaml}  # or vqgan-f16-256.yaml
ENCODER=${ENCODER:-configs/encoder/small.yaml}        # the attacker's encoder (no real CLIP)
MODEL=${MODEL:-configs/diffusion/ldm-256.yaml}        # target and shadows
FAMILY=${FAMILY:-diffusion}                           # the family of MODEL
GPUS=${GPUS:-8}                                       # per node = --ntasks-per-node above

# --ckpt_path of a run folder: Lightning's own HPC checkpoint if the job was requeued after
# SIGUSR1 (`#SBATCH --signal=SIGUSR1@90 --requeue`: SLURMEnvironment saves hpc_ckpt_N.ckpt in
# the run folder and requeues), else the run's last.ckpt; with neither, Lightning starts afresh.
ckpt_path() {
    if compgen -G "$1/hpc_ckpt_*.ckpt" > /dev/null; then echo hpc; else echo last; fi
}

mkdir -p logs
