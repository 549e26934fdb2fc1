"""Argument checks, initial factors and result casting shared by the weighted decompositions."""

import math
import numbers
import warnings

import numpy as np
import tensorly as tl

from .. import _backend as backend

INIT_NAMES = ("svd", "random", "whitened")


def check_tensor(tensor, name="tensor"):
    """Check that ``tensor`` is a finite numpy array or torch tensor of order >= 2."""
    backend.backend_of(tensor)
    if tl.ndim(tensor) < 2:
        raise ValueError(f"{name} must have at least 2 modes; got shape {tuple(tl.shape(tensor))}")
    if min(tl.shape(tensor)) == 0:
        raise ValueError(f"{name} must not be empty; got shape {tuple(tl.shape(tensor))}")
    if isinstance(tensor, np.ndarray):
        if tensor.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold real numbers; got dtype {tensor.dtype}")
    else:
        if tensor.layout != backend.torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor; got layout {tensor.layout}")
        if tensor.is_complex():
            raise TypeError(f"{name} must be real; got dtype {tensor.dtype}")
    if not backend.is_finite(tensor):
        raise ValueError(f"{name} contains NaN or infinite values")


def output_context(tensor):
    """Return the dtype and device of the results: the input's, or float64 for integer input."""
    if isinstance(tensor, np.ndarray):
        dtype = tensor.dtype if tensor.dtype.kind == "f" else np.dtype(np.float64)
        return {"dtype": dtype, "device": "cpu"}
    dtype = tensor.dtype if tensor.is_floating_point() else backend.torch.float64
    return {"dtype": dtype, "device": tensor.device}


def cast_result(array, context):
    """Cast an internal float64 array to the output dtype and device."""
    if isinstance(array, np.ndarray):
        return array.astype(context["dtype"], copy=False)
    return array.to(device=context["device"], dtype=context["dtype"])


def check_int(value, name, minimum=1):
    """Return ``value`` as an int after checking that it is an integer >= ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def check_nonnegative(value, name):
    """Check that ``value`` is a finite real number >= 0 (numpy scalars included)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def check_tol(tol):
    """Check the convergence tolerance."""
    check_nonnegative(tol, "tol")


def check_random_state(random_state):
    """Raise a ValueError unless ``random_state`` is a seed that TensorLy's random starts take."""
    if random_state is None or isinstance(random_state, np.random.RandomState):
        return
    is_int = isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool)
    if is_int and 0 <= random_state < 2**32:
        return
    raise ValueError(
        "random_state must be None, an int in [0, 2**32) or a numpy.random.RandomState; "
        f"got {random_state!r}"
    )


def check_init_finite(factors, name="init"):
    """Raise a ValueError if any array of a given start holds NaN or infinite values."""
    for index, factor in enumerate(factors):
        if factor is not None and not backend.is_finite(factor):
            raise ValueError(f"{name} array {index} contains NaN or infinite values")


def warn_clip(mode, requested, limit, reason, stacklevel):
    """Warn that the rank of ``mode`` was clipped, stating the request, the limit and its reason."""
    warnings.warn(
        f"rank for mode {mode} requested {requested}, but the limit is {limit} ({reason}); "
        f"using {limit}",
        stacklevel=stacklevel + 1,
    )


def clip_rank(rank, size, mode, stacklevel=2):
    """Clip a rank to the size of its mode, with a warning stating the change.

    ``stacklevel`` counts from the caller of this function, as in :func:`warnings.warn`.
    """
    if rank > size:
        warn_clip(mode, rank, size, f"the mode has size {size}", stacklevel + 1)
        return size
    return rank


def random_orthonormal(n_rows, n_columns, random_state, like):
    """Return an (n_rows, n_columns) matrix with orthonormal columns, drawn from ``random_state``.

    The numbers are drawn by numpy and then moved to the device of ``like``, so a seed gives the
    same start on every backend and device.
    """
    rng = tl.check_random_state(random_state)
    draw = rng.standard_normal((n_rows, n_columns))
    q, _ = np.linalg.qr(draw)
    return backend.to_compute(q, like)


def leading_eigenvectors(gram, n_vectors):
    """Return the eigenvectors of the symmetric ``gram`` for its ``n_vectors`` largest eigenvalues."""
    _, eigenvectors = tl.eigh((gram + tl.transpose(gram)) / 2)
    n_rows = tl.shape(gram)[0]
    columns = list(range(n_rows - 1, n_rows - 1 - n_vectors, -1))
    return eigenvectors[:, columns]


def leading_left_singular_vectors(matrix, n_vectors):
    """Return the ``n_vectors`` leading left singular vectors of ``matrix``."""
    n_rows, n_columns = tl.shape(matrix)
    if n_rows <= n_columns:
        return leading_eigenvectors(tl.dot(matrix, tl.transpose(matrix)), n_vectors)
    u, _, _ = tl.svd(matrix, full_matrices=False)
    return u[:, :n_vectors]


def orthonormalise(matrix):
    """Return the Q factor of a thin QR factorisation of ``matrix``, and its R factor."""
    q, r = tl.qr(matrix)
    return q, r


def check_callback(callback):
    """Check that ``callback`` is None or callable."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None; got {callback!r}")


def has_converged(rec_errors, tol):
    """Return True when the last sweep decreased the error by less than ``tol`` (relatively)."""
    if len(rec_errors) < 2:
        return bool(rec_errors) and rec_errors[-1] == 0
    previous, current = rec_errors[-2], rec_errors[-1]
    if previous == 0:
        return True
    return (previous - current) <= tol * previous
