"""lightning_mia: membership inference against text-to-image models, on PyTorch Lightning.

Reproduces Wu et al., "Membership Inference Attacks Against Text-to-image Generation Models"
(arXiv 2210.00968) for latent diffusion and DALL-E-mini-style seq2seq models.
"""

__version__ = "0.1.0"
