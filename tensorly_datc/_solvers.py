"""Linear solvers for the normal equations of the weighted decompositions.

Written with TensorLy's backend operations so that the same code runs on numpy and on torch
(CPU or CUDA); SciPy's solvers would tie the matrix-free path to numpy.
"""

import logging

import numpy as np
import tensorly as tl

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


def spd_solve(matrix, rhs):
    """Solve ``matrix @ x = rhs`` for a symmetric positive semi-definite ``matrix``.

    The LU solve is tried first; a singular or non-finite outcome falls back to the
    pseudo-inverse from an eigendecomposition, whose small eigenvalues are discarded.
    Batched matrices of shape (..., n, n) are accepted.
    """
    try:
        solution = tl.solve(matrix, rhs)
        if backend.is_finite(solution):
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


def conjugate_gradient(apply_matrix, rhs, start, apply_preconditioner=None, rtol=1e-6, max_iter=100):
    """Solve ``apply_matrix(x) = rhs`` for a symmetric positive definite linear operator.

    Preconditioned conjugate gradients on arrays of any shape (the inner product is the sum of
    element-wise products), warm-started from ``start``.

    Parameters
    ----------
    apply_matrix : callable
        Maps an array shaped like ``rhs`` to its product with the operator.
    rhs, start : tensor
        Right-hand side and starting point, of the same shape.
    apply_preconditioner : callable or None
        Approximate inverse of the operator; None means no preconditioning.
    rtol : float
        Stop once the residual norm is below ``rtol`` times the norm of ``rhs``.
    max_iter : int
        Maximum number of iterations.

    Returns
    -------
    solution : tensor
        Shaped like ``rhs``.
    n_iter : int
        Number of iterations run.
    """
    solution = start
    residual = rhs - apply_matrix(solution)
    target = rtol * float(tl.norm(rhs))
    if float(tl.norm(residual)) <= target:
        return solution, 0

    preconditioned = apply_preconditioner(residual) if apply_preconditioner else residual
    direction = preconditioned
    product = float(tl.sum(residual * preconditioned))
    for iteration in range(1, max_iter + 1):
        image = apply_matrix(direction)
        curvature = float(tl.sum(direction * image))
        if curvature <= 0:
            # The operator is positive definite, so this only happens once the residual is at
            # round-off level.
            return solution, iteration
        step = product / curvature
        solution = solution + step * direction
        residual = residual - step * image
        if float(tl.norm(residual)) <= target:
            return solution, iteration

        preconditioned = apply_preconditioner(residual) if apply_preconditioner else residual
        new_product = float(tl.sum(residual * preconditioned))
        direction = preconditioned + (new_product / product) * direction
        product = new_product
    return solution, max_iter
