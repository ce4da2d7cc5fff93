"""The method in plain PyTorch: the optimizer loop, losses, drift and image metrics, one batch's
fit. Imports torch only: no Lightning, no Hydra, no disk."""
