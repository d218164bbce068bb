"""robuq: quantization-aware training of Diffusion Transformers to W1.58A2 (after RobuQ)."""

__version__ = "0.1.0"
