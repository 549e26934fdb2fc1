"""Backend helpers: pick TensorLy's backend from the input, and the few operations TensorLy lacks.

The decompositions accept a numpy array or a torch tensor whatever TensorLy's global backend is,
and run every operation in the backend of the input tensor.
"""

import contextlib

import numpy as np
import tensorly as tl

try:
    import torch
except ImportError:  # torch is an optional dependency
    torch = None

__all__ = ["backend_of", "use_backend_of", "einsum", "is_finite", "to_compute", "device_of"]


def backend_of(tensor):
    """Return the name of the TensorLy backend that owns ``tensor`` ('numpy' or 'pytorch')."""
    if isinstance(tensor, np.ndarray):
        return "numpy"
    if torch is not None and isinstance(tensor, torch.Tensor):
        return "pytorch"
    raise TypeError(
        f"tensor must be a numpy.ndarray or a torch.Tensor; got {type(tensor).__name__}"
    )


@contextlib.contextmanager
def use_backend_of(tensor):
    """Run the enclosed block under the TensorLy backend of ``tensor``."""
    name = backend_of(tensor)
    if tl.get_backend() == name:
        yield name
    else:
        with tl.backend_context(name):
            yield name


def einsum(equation, *operands):
    """Evaluate ``equation`` with BLAS-backed contractions on numpy as well as on torch."""
    if isinstance(operands[0], np.ndarray):
        return np.einsum(equation, *operands, optimize=True)
    return tl.einsum(equation, *operands)


def is_finite(tensor):
    """Return True when every entry of ``tensor`` is finite."""
    if isinstance(tensor, np.ndarray):
        return bool(np.isfinite(tensor).all())
    return bool(torch.isfinite(tensor).all())


def to_compute(array, like):
    """Convert ``array`` (numpy, torch or nested lists) to float64 on the device of ``like``."""
    if isinstance(like, np.ndarray):
        if torch is not None and isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        return np.asarray(array, dtype=np.float64)
    if isinstance(array, torch.Tensor):
        return array.detach().to(device=like.device, dtype=torch.float64)
    return torch.tensor(np.asarray(array, dtype=np.float64), device=like.device)


def device_of(tensor):
    """Return the device of ``tensor`` as a string ('cpu' for numpy arrays)."""
    if isinstance(tensor, np.ndarray):
        return "cpu"
    return str(tensor.device)
