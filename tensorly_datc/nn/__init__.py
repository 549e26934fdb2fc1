"""Compression of PyTorch models with metric-weighted decompositions."""
