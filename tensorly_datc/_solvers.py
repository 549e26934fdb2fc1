"""Linear solvers for the normal equations of the weighted decompositions.

Written with TensorLy's backend operations so that the same code runs on numpy and on torch
(CPU or CUDA). Cholesky factorisations and triangular solves, which TensorLy lacks, dispatch to
``torch.linalg`` for torch tensors and to SciPy for numpy arrays.
"""

import contextlib
import logging
import threading

import numpy as np
import scipy.linalg
import tensorly as tl
from threadpoolctl import ThreadpoolController

from . import _backend as backend

logger = logging.getLogger(__name__)

SOLVER_NAMES = ("auto", "dense", "cg")

# Number of unknowns up to which 'auto' may form the normal equations densely (a few hundred
# megaflops to factor at most).
DENSE_MAX_UNKNOWNS = 2048

# 'auto' prefers the dense solve while factoring costs less than this many operator products,
# about what a warm-started conjugate-gradient solve takes.
DENSE_COST_IN_PRODUCTS = 30


def check_solver(solver):
    """Raise a ValueError unless ``solver`` is one of SOLVER_NAMES."""
    if solver not in SOLVER_NAMES:
        raise ValueError(f"solver must be one of {SOLVER_NAMES}; got {solver!r}")


def use_dense(solver, n_unknowns, product_flops):
    """Return True when the normal equations of ``n_unknowns`` unknowns are solved densely.

    ``product_flops`` is the cost of one matrix-free product with the operator.
    """
    if solver != "auto":
        return solver == "dense"
    factoring_flops = n_unknowns**3 / 3
    return n_unknowns <= DENSE_MAX_UNKNOWNS and factoring_flops <= DENSE_COST_IN_PRODUCTS * product_flops


def _linalg_error_types():
    errors = [np.linalg.LinAlgError]
    if backend.torch is not None:
        errors.append(backend.torch.linalg.LinAlgError)
    return tuple(errors)


def cholesky(matrix):
    """Return the lower Cholesky factor of a symmetric ``matrix``, or None if it is not positive
    definite to working precision.

    Only the lower triangle of ``matrix`` is read, so a matrix symmetric up to rounding needs
    no symmetrisation. Batched matrices of shape (..., n, n) are accepted.
    """
    if _on_cpu(matrix) and tl.ndim(matrix) == 2 and str(matrix.dtype).endswith(("float32", "float64")):
        lower = _lapack_cholesky(matrix)
        if lower is None:
            return None
        diagonal = lower.diagonal()
    elif isinstance(matrix, np.ndarray):
        try:
            lower = np.linalg.cholesky(matrix)
        except np.linalg.LinAlgError:
            return None
        diagonal = np.diagonal(lower, axis1=-2, axis2=-1)
    else:
        lower, info = backend.torch.linalg.cholesky_ex(matrix)
        if bool((info != 0).any()):
            return None
        diagonal = lower.diagonal(dim1=-2, dim2=-1)
    # A NaN or infinity in the lower triangle reaches the diagonal of the factor.
    return lower if backend.is_finite(diagonal) else None


def _on_cpu(array):
    return isinstance(array, np.ndarray) or array.device.type == "cpu"


# SciPy's OpenBLAS keeps its worker threads spinning for a while after each call. Those threads
# then compete for the cores with the threads of torch, or of NumPy's own OpenBLAS, which is a
# separate library with its own workers. So SciPy's LAPACK runs in the calling thread. We
# measured on 2 cores (torch 2.14, SciPy 1.17 with OpenBLAS 0.3.30). The README's NumPy example
# of weighted_tucker2 on a 64x32x3x3 weight took 0.17 s instead of 4.0 s. In alternated runs of
# weighted_tucker2 on the torch tensors of ResNet-18's last layer, the medians fell from 4.87,
# 4.83 and 4.50 s to 4.36, 4.47 and 4.44 s, although each factorisation took twice as long.
_THREADPOOLS = None
_LIMIT_DEPTH = 0


@contextlib.contextmanager
def _single_threaded_lapack():
    """Run the enclosed block with every BLAS library of the process limited to one thread.

    The number of BLAS threads is a setting of the whole process, and setting and restoring it
    while other threads run BLAS calls could leave it at one thread afterwards (seen with
    OpenBLAS 0.3.30). So only the main thread limits it; calls from other threads run with the
    settings they find.
    """
    global _THREADPOOLS, _LIMIT_DEPTH
    if threading.current_thread() is not threading.main_thread() or _LIMIT_DEPTH > 0:
        yield
        return
    if _THREADPOOLS is None:
        _THREADPOOLS = ThreadpoolController().select(user_api="blas")
    _LIMIT_DEPTH += 1
    try:
        with _THREADPOOLS.limit(limits=1):
            yield
    finally:
        _LIMIT_DEPTH -= 1


def potrf_lower(array, overwrite=False):
    """Factorise the lower triangle of the 2-D numpy ``array`` with LAPACK's potrf.

    The transpose of a row-major array is column-major, as LAPACK wants, and its upper triangle
    is the lower triangle of ``array``, so potrf runs on it without a transposed copy. Returns
    ``(lower, info)``, ``info`` being 0 on success. With ``overwrite`` the factor is written
    into the lower triangle of ``array`` itself (when it is C-contiguous), and the upper
    triangle keeps its entries. Otherwise ``lower`` is a new array with its upper triangle
    cleared.
    """
    (potrf,) = scipy.linalg.lapack.get_lapack_funcs(("potrf",), (array,))
    flag = 1 if overwrite else 0
    with _single_threaded_lapack():
        upper, info = potrf(array.T, lower=0, clean=1 - flag, overwrite_a=flag)
    return upper.T, info


def _lapack_cholesky(matrix):
    """Return the lower Cholesky factor of a 2-D CPU ``matrix`` from LAPACK's potrf, or None.

    Torch's own factorisation copies a row-major matrix first and clears the upper triangle in
    a separate pass. On a 2304 x 2304 matrix it took about 1.4 times as long on 2 cores (torch
    2.14).
    """
    array = matrix if isinstance(matrix, np.ndarray) else matrix.detach().numpy()
    lower, info = potrf_lower(array)
    if info != 0:
        return None
    return lower if isinstance(matrix, np.ndarray) else backend.torch.from_numpy(lower)


def solve_triangular(lower, rhs, transpose=False):
    """Solve ``lower @ x = rhs`` (or ``lower.T @ x = rhs``) for a lower triangular 2-D ``lower``."""
    if isinstance(lower, np.ndarray):
        with _single_threaded_lapack():
            return scipy.linalg.solve_triangular(lower, rhs, lower=True, trans=1 if transpose else 0,
                                                 check_finite=False)
    if transpose:
        return backend.torch.linalg.solve_triangular(lower.mT, rhs, upper=True)
    return backend.torch.linalg.solve_triangular(lower, rhs, upper=False)


def _cholesky_solve(lower, rhs):
    """Solve ``lower @ lower.T @ x = rhs``; batched on torch, 2-D only on numpy."""
    if isinstance(lower, np.ndarray):
        with _single_threaded_lapack():
            return scipy.linalg.cho_solve((lower, True), rhs, check_finite=False)
    if rhs.ndim == lower.ndim - 1:
        return backend.torch.cholesky_solve(rhs[..., None], lower)[..., 0]
    return backend.torch.cholesky_solve(rhs, lower)


def spd_solve(matrix, rhs):
    """Solve ``matrix @ x = rhs`` for a symmetric positive semi-definite ``matrix``.

    A Cholesky solve is tried first (an LU solve for batched numpy matrices, which SciPy's
    Cholesky routines do not take). A failed factorisation or a non-finite outcome falls back to
    the pseudo-inverse from an eigendecomposition, whose small eigenvalues are discarded.
    Batched matrices of shape (..., n, n) are accepted.
    """
    try:
        if isinstance(matrix, np.ndarray) and matrix.ndim > 2:
            solution = np.linalg.solve(matrix, rhs)
        else:
            lower = cholesky(matrix)
            solution = None if lower is None else _cholesky_solve(lower, rhs)
        if solution is not None and backend.is_finite(solution):
            return solution
    except _linalg_error_types():
        pass
    logger.debug("singular normal equations of side %d: using a pseudo-inverse", tl.shape(matrix)[-1])
    return tl.dot(spd_pseudo_inverse(matrix), rhs) if tl.ndim(matrix) == 2 else _batched_pinv_solve(
        matrix, rhs
    )


def spd_pseudo_inverse(matrix, rcond=1e-12):
    """Return the pseudo-inverse of a symmetric PSD ``matrix`` from its eigendecomposition."""
    eigenvalues, eigenvectors = tl.eigh((matrix + tl.transpose(matrix)) / 2)
    cutoff = tl.max(tl.abs(eigenvalues)) * rcond
    keep = eigenvalues > cutoff
    safe = tl.where(keep, eigenvalues, tl.ones(tl.shape(eigenvalues), **tl.context(eigenvalues)))
    inverse = tl.where(keep, 1 / safe, 0 * eigenvalues)
    return tl.dot(eigenvectors * inverse, tl.transpose(eigenvectors))


def _batched_pinv_solve(matrices, rhs):
    solutions = [tl.dot(spd_pseudo_inverse(matrices[i]), rhs[i]) for i in range(tl.shape(matrices)[0])]
    return tl.stack(solutions)


def _symmetric_from_lower(matrix):
    """Return the symmetric matrix whose lower triangle is that of ``matrix``."""
    if isinstance(matrix, np.ndarray):
        lower = np.tril(matrix, -1)
    else:
        lower = backend.torch.tril(matrix, -1)
    return lower + tl.transpose(lower) + tl.diag(tl.diag(matrix))


class InverseFactor:
    """A factor ``F`` with ``F @ F.T`` the inverse of a symmetric positive semi-definite matrix.

    ``F`` is the inverse transpose of the Cholesky factor, or, when the factorisation fails,
    ``V diag(lambda)^-1/2`` over the eigenpairs above ``rcond`` times the largest eigenvalue
    (then ``F @ F.T`` is the pseudo-inverse). Products with ``F`` are triangular solves, so
    ``F`` is never formed in the Cholesky case. Only the lower triangle of the matrix is read,
    so a matrix symmetric up to rounding, or one whose upper triangle is not set, needs no
    symmetrisation.
    """

    def __init__(self, matrix, rcond=1e-12):
        self.lower = cholesky(matrix)
        self.root = None
        if self.lower is None:
            logger.debug("singular matrix of side %d: using its pseudo-inverse", tl.shape(matrix)[0])
            eigenvalues, eigenvectors = tl.eigh(_symmetric_from_lower(matrix))
            keep = eigenvalues > tl.max(tl.abs(eigenvalues)) * rcond
            safe = tl.where(keep, eigenvalues, tl.ones(tl.shape(eigenvalues), **tl.context(eigenvalues)))
            self.root = eigenvectors * tl.where(keep, 1 / tl.sqrt(safe), 0 * eigenvalues)

    def right_multiply(self, rows):
        """Return ``rows @ F`` for ``rows`` of shape (n, size)."""
        if self.root is not None:
            return tl.dot(rows, self.root)
        # rows @ L^-T = (L^-1 @ rows^T)^T
        return tl.transpose(solve_triangular(self.lower, tl.transpose(rows)))

    def right_multiply_transpose(self, rows):
        """Return ``rows @ F.T`` for ``rows`` of shape (n, size)."""
        if self.root is not None:
            return tl.dot(rows, tl.transpose(self.root))
        # rows @ L^-1 = (L^-T @ rows^T)^T
        return tl.transpose(solve_triangular(self.lower, tl.transpose(rows), transpose=True))


def conjugate_gradient(apply_matrix, rhs, start, apply_preconditioner=None, rtol=1e-6, max_iter=100,
                       reduction=0.0, min_iter=0, residual=None, auxiliary=None):
    """Solve ``apply_matrix(x) = rhs`` for a symmetric positive definite linear operator.

    Preconditioned conjugate gradients on arrays of any shape (the inner product is the sum of
    element-wise products), warm-started from ``start``.

    Parameters
    ----------
    apply_matrix : callable
        Maps an array shaped like ``rhs`` to its product with the operator. With ``auxiliary``
        given, it returns a pair: that product and the image of the same array under a second
        linear map ``B``.
    rhs, start : tensor
        Right-hand side and starting point, of the same shape.
    apply_preconditioner : callable or None
        Approximate inverse of the operator; None means no preconditioning.
    rtol : float
        Stop once the residual norm is below ``rtol`` times the norm of ``rhs``.
    max_iter : int
        Maximum number of iterations.
    reduction : float, default is 0
        Also stop once the preconditioned residual norm ``sqrt(r^T P r)`` is below ``reduction``
        times that of the start. A value in (0, 1) makes an inexact solve whose cost does not
        grow as the start approaches the solution, as alternating minimisation needs. The
        preconditioned norm is used because it falls more steadily than the residual norm.
    min_iter : int, default is 0
        Minimum number of iterations, run even when the start already meets ``rtol``.
    residual : tensor or None
        ``rhs - apply_matrix(start)`` when the caller already has it, which saves one product.
    auxiliary : tensor or None
        ``B(start)``. The solver then also returns ``B(solution)``, built from the images of
        the search directions, so the caller gets it without applying ``B`` again. It is
        updated in place (it can be as large as the metric basis of the Tucker-2 solves, and a
        new array of that size per iteration cost more than the update).

    Returns
    -------
    solution : tensor
        Shaped like ``rhs``.
    n_iter : int
        Number of iterations run.
    auxiliary : tensor
        ``B(solution)``; returned only when ``auxiliary`` is given.
    """
    solution = start
    if residual is None:
        residual = rhs - _image(apply_matrix(solution), auxiliary)
    target = rtol * float(tl.norm(rhs))
    if min_iter == 0 and float(tl.norm(residual)) <= target:
        return _outputs(solution, 0, auxiliary)

    preconditioned = apply_preconditioner(residual) if apply_preconditioner else residual
    direction = preconditioned
    product = float(tl.sum(residual * preconditioned))
    product_target = (reduction**2) * product
    for iteration in range(1, max_iter + 1):
        image = apply_matrix(direction)
        if auxiliary is not None:
            image, direction_auxiliary = image
        curvature = float(tl.sum(direction * image))
        if curvature <= 0:
            # The operator is positive definite, so this only happens once the residual is at
            # round-off level.
            return _outputs(solution, iteration, auxiliary)
        step = product / curvature
        solution = solution + step * direction
        if auxiliary is not None:
            auxiliary = backend.add_scaled_(auxiliary, step, direction_auxiliary)
        residual = residual - step * image
        converged = float(tl.norm(residual)) <= target
        if iteration >= min_iter and converged:
            return _outputs(solution, iteration, auxiliary)

        preconditioned = apply_preconditioner(residual) if apply_preconditioner else residual
        new_product = float(tl.sum(residual * preconditioned))
        if iteration >= min_iter and new_product <= product_target:
            return _outputs(solution, iteration, auxiliary)
        direction = preconditioned + (new_product / product) * direction
        product = new_product
    return _outputs(solution, max_iter, auxiliary)


def _image(result, auxiliary):
    """Return the operator's product from ``apply_matrix``'s result."""
    return result if auxiliary is None else result[0]


def _outputs(solution, n_iter, auxiliary):
    return (solution, n_iter) if auxiliary is None else (solution, n_iter, auxiliary)
