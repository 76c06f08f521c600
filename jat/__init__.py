"""JaT-AudioSR: audio super-resolution with a Diffusion Transformer on codec latents."""

__version__ = "0.1.0"
