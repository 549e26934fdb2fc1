"""The metric of a weighted decomposition: validation, regularisation and products with it.

A metric ``M`` is a symmetric positive semi-definite matrix acting on the columns of the
mode-0 unfolding ``X_(0) = tensor.reshape(I0, -1)`` (all modes but the first, in C order),
so that a decomposition minimises

.. math::

    f(\\tilde X) = \\| (X - \\tilde X)_{(0)} M^{1/2} \\|_F^2
                 = \\operatorname{tr}\\big((X - \\tilde X)_{(0)} M (X - \\tilde X)_{(0)}^T\\big).

Four forms are accepted, from the most general to the cheapest:

* a dense matrix of side ``D = prod(shape[1:])``;
* a 1-D vector of ``D`` non-negative weights (a diagonal metric);
* a list of per-mode matrices for modes ``1, ..., N-1`` whose Kronecker product is the metric
  (never formed densely; ``None`` in the list stands for an identity);
* ``None``, the identity, which gives back the ordinary Frobenius decomposition.

Every form is converted to float64 on the tensor's device, checked, and regularised by adding
``metric_reg`` times its mean eigenvalue to its diagonal, so that the normal equations of the
decompositions stay positive definite when the metric is singular.
"""

import logging
import math
import numbers

import numpy as np
import tensorly as tl

from . import _backend as backend
from ._solvers import potrf_lower

__all__ = ["as_metric", "IdentityMetric", "DenseMetric", "DiagonalMetric", "KroneckerMetric"]

logger = logging.getLogger(__name__)

# Relative asymmetry max|M - M^T| / max|M| above which a metric is rejected. Statistics summed
# in float64 are symmetric to about 1e-15; anything far above that is a wrong input. A metric
# passed in a lower precision is allowed SYMMETRY_ROUNDINGS times its machine epsilon instead
# when that is larger, because a float32 sum of batch products can be asymmetric by about 2e-8.
SYMMETRY_TOL = 1e-8
SYMMETRY_ROUNDINGS = 100

# Shift, relative to the mean eigenvalue, under which the PSD check still passes. It absorbs
# the round-off of statistics whose chunk products were formed in float32 (eigenvalues down to
# about -1e-6 times the mean for a singular matrix) but rejects a clearly indefinite matrix.
PSD_TOL = 1e-5


class IdentityMetric:
    """Identity metric of side ``size``: the Frobenius norm."""

    kind = "identity"

    def __init__(self, size):
        self.size = size

    def rmatmul(self, matrix):
        """Return ``matrix @ M`` for ``matrix`` of shape (n, size)."""
        return matrix

    def quadratic(self, matrix):
        """Return ``tr(matrix M matrix^T)``."""
        return tl.sum(matrix * matrix)


class DenseMetric:
    """Dense symmetric positive definite metric (already regularised)."""

    kind = "dense"

    def __init__(self, matrix):
        self.matrix = matrix
        self.size = tl.shape(matrix)[0]

    def rmatmul(self, matrix):
        """Return ``matrix @ M`` for ``matrix`` of shape (n, size)."""
        return tl.dot(matrix, self.matrix)

    def quadratic(self, matrix):
        """Return ``tr(matrix M matrix^T)``."""
        return tl.sum(matrix * self.rmatmul(matrix))


class DiagonalMetric:
    """Diagonal metric given by its positive ``weights`` (already regularised)."""

    kind = "diagonal"

    def __init__(self, weights):
        self.weights = weights
        self.size = tl.shape(weights)[0]

    def rmatmul(self, matrix):
        """Return ``matrix @ diag(weights)`` for ``matrix`` of shape (n, size)."""
        return matrix * self.weights

    def quadratic(self, matrix):
        """Return ``tr(matrix M matrix^T)``."""
        return tl.sum(matrix * matrix * self.weights)


class KroneckerMetric:
    """Kronecker product of per-mode matrices (already regularised), never formed densely.

    ``factors[k]`` acts on mode ``k + 1`` of the tensor; ``None`` stands for an identity.
    """

    kind = "kronecker"

    def __init__(self, factors, mode_sizes):
        self.factors = list(factors)
        self.mode_sizes = tuple(mode_sizes)
        self.size = math.prod(mode_sizes)

    def rmatmul(self, matrix):
        """Return ``matrix @ kron(factors)`` for ``matrix`` of shape (n, size)."""
        n_rows = tl.shape(matrix)[0]
        result = tl.reshape(matrix, (n_rows,) + self.mode_sizes)
        for mode, factor in enumerate(self.factors):
            if factor is not None:
                # The factors are symmetric, so the mode product needs no transpose.
                result = tl.tenalg.mode_dot(result, factor, mode + 1)
        return tl.reshape(result, (n_rows, self.size))

    def quadratic(self, matrix):
        """Return ``tr(matrix M matrix^T)``."""
        return tl.sum(matrix * self.rmatmul(matrix))

    def square_roots(self):
        """Return the symmetric square roots of the factors and of their inverses (or None)."""
        roots, inverse_roots = [], []
        for factor in self.factors:
            if factor is None:
                roots.append(None)
                inverse_roots.append(None)
                continue
            eigenvalues, eigenvectors = tl.eigh(factor)
            floor = tl.max(eigenvalues) * 1e-14
            eigenvalues = tl.clip(eigenvalues, floor, None)
            roots.append(tl.dot(eigenvectors * tl.sqrt(eigenvalues), tl.transpose(eigenvectors)))
            inverse_roots.append(
                tl.dot(eigenvectors / tl.sqrt(eigenvalues), tl.transpose(eigenvectors))
            )
        return roots, inverse_roots


def _describe(value):
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"an array of shape {tuple(shape)}"
    return f"a {type(value).__name__}"


def _convert(matrix, tensor, name):
    """Convert a user metric array to float64 on the tensor's device, rejecting mixed devices."""
    if backend.torch is not None and isinstance(matrix, backend.torch.Tensor):
        if not isinstance(tensor, np.ndarray) and matrix.device != tensor.device:
            raise ValueError(
                f"{name} is on device {matrix.device} but the tensor is on {tensor.device}; "
                "move the metric to the tensor's device"
            )
    elif not isinstance(matrix, np.ndarray):
        try:
            matrix = np.asarray(matrix, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{name} must be an array or tensor of numbers; got {_describe(matrix)}"
            ) from error
    is_complex = (np.iscomplexobj(matrix) if isinstance(matrix, np.ndarray)
                  else backend.torch is not None and isinstance(matrix, backend.torch.Tensor)
                  and matrix.is_complex())
    if is_complex:
        raise TypeError(f"{name} must be real; got dtype {matrix.dtype}")
    converted = backend.to_compute(matrix, tensor)
    if not backend.is_finite(converted):
        raise ValueError(f"{name} contains NaN or infinite values")
    return converted


def _symmetry_tolerance(matrix):
    """Return the relative asymmetry accepted for ``matrix`` as the caller passed it."""
    dtype = getattr(matrix, "dtype", None)
    epsilon = 0.0
    if backend.torch is not None and isinstance(dtype, backend.torch.dtype):
        if dtype.is_floating_point:
            epsilon = backend.torch.finfo(dtype).eps
    elif dtype is not None and np.issubdtype(dtype, np.floating):
        epsilon = float(np.finfo(dtype).eps)
    return max(SYMMETRY_TOL, SYMMETRY_ROUNDINGS * epsilon)


def _check_symmetric(matrix, name, tolerance=SYMMETRY_TOL):
    """Return the symmetric part of ``matrix``, a new array, after checking that it is symmetric."""
    scale = backend.max_abs(matrix)
    symmetric = backend.empty_like(matrix)
    # Each tile above the diagonal is averaged with the transpose of its mirror tile, so M is
    # read once and its transposed reads stay in cache. Adding M and M^T whole and then
    # checking the difference took 1.5 times as long for a side of 4608 (torch 2.14, CPU).
    size = tl.shape(matrix)[0]
    asymmetry = 0.0
    for start in range(0, size, _SYMMETRY_TILE):
        rows = slice(start, min(start + _SYMMETRY_TILE, size))
        for column_start in range(start, size, _SYMMETRY_TILE):
            columns = slice(column_start, min(column_start + _SYMMETRY_TILE, size))
            upper = matrix[rows, columns]
            lower = tl.transpose(matrix[columns, rows])
            asymmetry = max(asymmetry, backend.max_abs(upper - lower))
            average = (upper + lower) * 0.5
            symmetric[rows, columns] = average
            symmetric[columns, rows] = tl.transpose(average)
    if asymmetry > tolerance * scale:
        raise ValueError(
            f"{name} must be symmetric; got max |M - M^T| = {asymmetry:.3g} for max |M| = "
            f"{scale:.3g}, and at most {tolerance:.3g} times max |M| is accepted. If the "
            "asymmetry is rounding, pass the symmetric part (M + M.T) / 2."
        )
    return symmetric


# Side of the tiles that _check_symmetric averages with their mirror tiles
_SYMMETRY_TILE = 256


def _is_positive_definite(matrix):
    """Return True when a Cholesky factorisation of the symmetric ``matrix`` succeeds.

    On the CPU the factorisation runs in the lower triangle of ``matrix`` itself, which is then
    copied back from the upper triangle. A factorisation into a new array allocates two copies
    of the matrix, which took a third of its time for a side of 4608.
    """
    array = matrix if isinstance(matrix, np.ndarray) else None
    if array is None and matrix.device.type == "cpu":
        array = matrix.numpy()
    if array is None or not array.flags.c_contiguous:
        if isinstance(matrix, np.ndarray):
            try:
                np.linalg.cholesky(matrix)
            except np.linalg.LinAlgError:
                return False
            return True
        _, info = backend.torch.linalg.cholesky_ex(matrix)
        return int(info) == 0

    diagonal = np.diag(array).copy()
    _, info = potrf_lower(array, overwrite=True)
    _copy_upper_to_lower(array)
    array[np.diag_indices_from(array)] = diagonal
    return info == 0


def _copy_upper_to_lower(array, block=512):
    """Overwrite the strict lower triangle of the square ``array`` with its upper triangle."""
    size = array.shape[0]
    for start in range(0, size, block):
        stop = min(start + block, size)
        array[start:stop, :start] = array[:start, start:stop].T
        diagonal_block = array[start:stop, start:stop]
        upper = np.triu(diagonal_block, 1)
        diagonal_block[...] = upper + upper.T


def _regularise_matrix(matrix, name, metric_reg, size):
    """Check that a symmetric matrix is PSD and add ``metric_reg`` times its mean eigenvalue.

    The diagonal of ``matrix`` is changed in place, so it must be an array of the caller's own.
    """
    mean_eigenvalue = float(tl.trace(matrix)) / size
    if mean_eigenvalue < 0 or (mean_eigenvalue == 0 and float(tl.max(tl.abs(matrix))) > 0):
        raise ValueError(
            f"{name} must be symmetric positive semi-definite; its trace is "
            f"{mean_eigenvalue * size:.3g}, so it has negative eigenvalues"
        )
    if mean_eigenvalue == 0:
        raise ValueError(
            f"{name} is zero (trace {mean_eigenvalue * size:.3g}); a metric must have a "
            "positive trace. For a layer whose inputs are all zero, use the Frobenius norm."
        )
    tolerance = PSD_TOL * mean_eigenvalue
    positive_definite = _is_positive_definite(backend.add_to_diagonal_(matrix, tolerance))
    # Shifting the diagonal back keeps every entry within one rounding of the original.
    backend.add_to_diagonal_(matrix, -tolerance)
    if not positive_definite:
        raise ValueError(
            f"{name} must be symmetric positive semi-definite; a Cholesky factorisation "
            f"failed after adding {PSD_TOL:g} times its mean eigenvalue to the diagonal, so it "
            "has clearly negative eigenvalues"
        )
    if metric_reg == 0:
        return matrix
    shift = metric_reg * mean_eigenvalue
    logger.debug("regularised %s: added %.3g (metric_reg %g) to its diagonal", name, shift, metric_reg)
    return backend.add_to_diagonal_(matrix, shift)


def _square_metric(matrix, tensor, name, size, metric_reg):
    tolerance = _symmetry_tolerance(matrix)
    matrix = _convert(matrix, tensor, name)
    if tl.ndim(matrix) != 2 or tuple(tl.shape(matrix)) != (size, size):
        raise ValueError(
            f"{name} must be a symmetric positive semi-definite matrix of shape ({size}, {size}); "
            f"got shape {tuple(tl.shape(matrix))}"
        )
    matrix = _check_symmetric(matrix, name, tolerance)
    return _regularise_matrix(matrix, name, metric_reg, size)


def _diagonal_metric(weights, tensor, size, metric_reg):
    weights = _convert(weights, tensor, "metric")
    if tuple(tl.shape(weights)) != (size,):
        raise ValueError(
            f"a diagonal metric must be a vector of length {size}; got shape "
            f"{tuple(tl.shape(weights))}"
        )
    if float(tl.min(weights)) < 0:
        raise ValueError(
            f"a diagonal metric must be non-negative; got a minimum weight of "
            f"{float(tl.min(weights)):.3g}"
        )
    mean = float(tl.mean(weights))
    if mean == 0:
        raise ValueError("the diagonal metric is all zero; a metric must have a positive trace")
    return DiagonalMetric(weights + metric_reg * mean)


def _kronecker_metric(factors, tensor, mode_sizes, metric_reg):
    if len(factors) != len(mode_sizes):
        raise ValueError(
            f"a Kronecker metric needs one matrix (or None) for each of the modes 1..{len(mode_sizes)} "
            f"of sizes {mode_sizes}; got a list of {len(factors)} entries. A dense metric given as "
            "nested lists must be converted to an array first (numpy.asarray)."
        )
    converted = []
    for mode, (factor, mode_size) in enumerate(zip(factors, mode_sizes), start=1):
        if factor is None:
            converted.append(None)
            continue
        converted.append(
            _square_metric(factor, tensor, f"metric[{mode - 1}] (mode {mode})", mode_size, metric_reg)
        )
    return KroneckerMetric(converted, mode_sizes)


def as_metric(metric, tensor, *, metric_reg=1e-6):
    """Validate ``metric`` for ``tensor`` and return it as a regularised float64 metric object.

    Parameters
    ----------
    metric : None, ndarray, or list of ndarray or None
        The metric in one of the forms listed in the module documentation.
    tensor : ndarray or torch.Tensor
        Tensor of order >= 2 to be decomposed; the metric acts on the columns of its mode-0
        unfolding and is moved to its device in float64.
    metric_reg : float, default is 1e-6
        Ridge added to the metric, relative to its mean eigenvalue (for a Kronecker metric, to
        each factor's). It keeps the solves well posed when the metric is singular, for
        instance for dead input channels, and costs a relative change of about ``metric_reg``
        in the objective. 0 disables it.

    Returns
    -------
    IdentityMetric, DenseMetric, DiagonalMetric or KroneckerMetric

    Raises
    ------
    ValueError
        If the metric has the wrong shape, is not finite, not symmetric, not positive
        semi-definite, is zero, or lives on another device than ``tensor``.
    """
    with backend.use_backend_of(tensor):
        return _as_metric(metric, tensor, metric_reg)


def _as_metric(metric, tensor, metric_reg):
    shape = tuple(tl.shape(tensor))
    if len(shape) < 2:
        raise ValueError(f"the tensor must have at least 2 modes for a metric; got shape {shape}")
    size = math.prod(shape[1:])
    if (isinstance(metric_reg, bool) or not isinstance(metric_reg, numbers.Real)
            or not metric_reg >= 0 or math.isinf(metric_reg)):
        raise ValueError(f"metric_reg must be a finite number >= 0; got {metric_reg!r}")

    if metric is None:
        return IdentityMetric(size)
    if isinstance(metric, (list, tuple)):
        return _kronecker_metric(metric, tensor, shape[1:], metric_reg)
    n_dims = len(getattr(metric, "shape", ()))
    if n_dims == 1:
        return _diagonal_metric(metric, tensor, size, metric_reg)
    if n_dims == 2:
        return DenseMetric(_square_metric(metric, tensor, "metric", size, metric_reg))
    raise ValueError(
        f"metric must be None, a ({size}, {size}) matrix, a vector of length {size}, or a list "
        f"of per-mode matrices for the modes of sizes {shape[1:]}; got {_describe(metric)}"
    )


def kronecker_approximation(metric, mode_sizes):
    """Return per-mode matrices ``(M_1, M_rest)`` whose Kronecker product approximates ``metric``.

    ``M_1`` (I1 x I1) averages the diagonal blocks of the other modes and ``M_rest`` (K x K)
    averages the blocks of mode 1; the product is exact up to scale when ``metric`` is itself a
    Kronecker product. Used for the whitened initialisation.
    """
    first = mode_sizes[0]
    rest = math.prod(mode_sizes[1:])
    if metric.kind == "identity":
        return None, None
    if metric.kind == "kronecker":
        return metric.factors[0], None
    if metric.kind == "diagonal":
        blocks = tl.reshape(metric.weights, (first, rest))
        return tl.diag(tl.mean(blocks, axis=1)), tl.diag(tl.mean(blocks, axis=0))
    blocks = tl.reshape(metric.matrix, (first, rest, first, rest))
    first_factor = backend.einsum("akbk->ab", blocks) / rest
    rest_factor = backend.einsum("akal->kl", blocks) / first
    return first_factor, rest_factor
