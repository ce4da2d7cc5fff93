"""The Lightning and Hydra shell: the LightningModule that fits each batch, the progress bar and
one-line errors."""
