"""The model and the machine: loading a VAE (hub id, directory, single file, shipped asset) as a
FrozenVAE, the device and precision it runs at, and the memory a batch needs."""
