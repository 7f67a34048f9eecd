"""Attack a target model.

python attack.py --ckpt runs/demo/diffusion-target-000/checkpoints/last.ckpt
"""

from lightning_mia.cli import attack_main

if __name__ == "__main__":
    attack_main()
