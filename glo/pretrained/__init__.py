"""Pretrained autoencoders shipped in the package, trained by others on real photos (each folder:
its weights, LICENSE and model card). Loaded by `vae.asset=<folder>`, as any other local model."""

from pathlib import Path

PRETRAINED = Path(__file__).parent
