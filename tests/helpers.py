"""Helpers shared by the test modules."""

import numpy as np

try:
    import torch
except ImportError:  # the numpy tests run without torch
    torch = None


def to_numpy(array):
    """Return ``array`` (numpy or torch, any float dtype or device) as a float64 numpy array."""
    if torch is not None and isinstance(array, torch.Tensor):
        return array.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(array, dtype=np.float64)
