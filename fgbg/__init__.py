"""fgbg: foreground/background separation by concept distillation from diffusion models."""
__version__ = "0.1.0"
