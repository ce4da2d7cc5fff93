"""The run directory: shards and their merge, the fingerprint and lock that keep a dataset of one
kind, and writes that are complete or absent."""
