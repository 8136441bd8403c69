"""zr-diffusion: text-to-image post-training with differentiable reasoning-internalized rewards."""

__version__ = "0.1.0"
