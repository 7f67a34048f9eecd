"""Train and query lightning_mia models.

python train.py fit --config configs/diffusion/tiny.yaml
"""

from lightning_mia.cli import train_main

if __name__ == "__main__":
    train_main()
