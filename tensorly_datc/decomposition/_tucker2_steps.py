"""Block updates of the metric-weighted Tucker-2 decomposition.

Notation: the tensor is unfolded as ``W`` of shape (I0, D) with ``D = I1 * K`` (mode 1 slowest,
then the remaining modes flattened into K "taps"), the metric ``M`` is (D, D), and the model is
``W~ = U_T G kron(U_S, I_K)^T`` with ``U_T`` (I0, R0), ``U_S`` (I1, R1) and ``G`` (R0, R1 * K).
Each update minimises ``tr((W - W~) M (W - W~)^T)`` exactly over its block (up to the accuracy
of the inner solver), so the objective never increases.

For a dense metric the updates work in tap-major order, which indexes the D columns as (k, s)
instead of (s, k). There ``kron(U_S, I_K)`` becomes ``kron(I_K, U_S)``, a block-diagonal
matrix, so every product with it is one matrix product with ``U_S`` and needs no copy of ``M``.
"""

import weakref

import numpy as np
import tensorly as tl

from .. import _backend as backend
from .._solvers import InverseFactor, conjugate_gradient, spd_pseudo_inverse, spd_solve, use_dense
from ._common import leading_eigenvectors

# Residual reduction that ends the conjugate-gradient solve of each sweep. A loose solve costs
# little progress per sweep: on a 512x512x3x3 ResNet-18 weight with its 4608x4608 input second
# moment, ranks (256, 256), sweeps with one and with eight iterations both reach a relative
# error within 0.1 % of each other after 10 sweeps, and the single iteration costs a quarter.
CG_REDUCTION = 0.5

# Arrays derived from a dense metric for one decomposition, keyed by the metric object (which
# the decomposition creates for each call), so they are freed with it.
# NOTE: the step functions receive only (unfolded, metric), so this cache stands in for a work
# object that the alternating driver could create and pass to them.
_DENSE_PROBLEMS = weakref.WeakKeyDictionary()


class _DenseProblem:
    """The arrays a dense-metric decomposition reuses in every sweep, in tap-major order.

    Attributes
    ----------
    metric : tensor of shape (D, D)
        ``M`` with both indices in tap-major order (a second copy of the metric).
    metric32 : tensor of shape (D, D)
        The same in float32, for the products of the conjugate-gradient directions.
    weighted_tensor : tensor of shape (I0 * K, I1)
        ``W M`` in tap-major order, rows (i0, k).
    channel_inverse : tensor of shape (I1, I1)
        Pseudo-inverse of the mean diagonal tap block of ``M``, for the preconditioner.
    input_factor, metric_basis : tensor or None
        The input factor of the last joint update and ``M kron(I_K, U_S)`` (D, K * R1) for it,
        which give the first residual of the next input-factor solve without a product with ``M``.
    """

    def __init__(self, unfolded, metric, n_taps):
        n_outputs, size = tl.shape(unfolded)
        n_inputs = size // n_taps
        self.unfolded = unfolded
        self.n_taps = n_taps
        self.n_inputs = n_inputs

        blocks = tl.reshape(metric.matrix, (n_inputs, n_taps, n_inputs, n_taps))
        self.metric = tl.reshape(tl.transpose(blocks, (1, 0, 3, 2)), (size, size))
        self.metric32 = _to_float32(self.metric)
        weighted = tl.reshape(metric.rmatmul(unfolded), (n_outputs, n_inputs, n_taps))
        self.weighted_tensor = tl.reshape(tl.transpose(weighted, (0, 2, 1)), (n_outputs * n_taps, n_inputs))
        tap_blocks = tl.reshape(self.metric, (n_taps, n_inputs, n_taps, n_inputs))
        self.channel_inverse = spd_pseudo_inverse(backend.einsum("kakb->ab", tap_blocks) / n_taps)
        self.input_factor = None
        self.metric_basis = None


def _to_float32(array):
    if isinstance(array, np.ndarray):
        return array.astype(np.float32)
    return array.to(backend.torch.float32)


def _to_float64(array):
    if isinstance(array, np.ndarray):
        return array.astype(np.float64)
    return array.to(backend.torch.float64)


def _dense_problem(unfolded, metric, n_taps):
    """Return the cached :class:`_DenseProblem` of ``metric``, building it for a new ``unfolded``."""
    problem = _DENSE_PROBLEMS.get(metric)
    if problem is None or problem.unfolded is not unfolded or problem.n_taps != n_taps:
        problem = _DenseProblem(unfolded, metric, n_taps)
        _DENSE_PROBLEMS[metric] = problem
    return problem


def _to_tap_major(core, n_taps):
    """Reorder the core's columns from (r, k) to (k, r): (R0, R1 * K) to (R0, K, R1)."""
    rank_out = tl.shape(core)[0]
    return tl.transpose(tl.reshape(core, (rank_out, -1, n_taps)), (0, 2, 1))


def _from_tap_major(core, n_taps):
    """Inverse of :func:`_to_tap_major`, returned as a (R0, R1 * K) matrix."""
    rank_out = tl.shape(core)[0]
    core = tl.transpose(tl.reshape(core, (rank_out, n_taps, -1)), (0, 2, 1))
    return tl.reshape(core, (rank_out, -1))


def metric_times_kron(metric, input_factor, n_taps):
    """Return ``M @ kron(input_factor, I_K)``, of shape (D, R1 * K), for a non-dense metric."""
    # NOTE: a diagonal metric goes through kron(U_S, I_K) formed explicitly, of size D x R1 K;
    # its block structure (one R1 x R1 block per tap) is not exploited yet.
    n_inputs, rank = tl.shape(input_factor)
    size = metric.size
    # kron(U_S, I_K), built by broadcasting (TensorLy's torch kron rejects column slices).
    identity = tl.eye(n_taps, **tl.context(input_factor))
    expanded = tl.reshape(
        input_factor[:, None, :, None] * identity[None, :, None, :], (size, rank * n_taps)
    )
    return tl.transpose(metric.rmatmul(tl.transpose(expanded)))


def _fit_output_and_core(normal, projected, output_rank):
    """Return the optimal (U_T, core, captured) for the normal matrix ``N`` and ``W M P``.

    With ``N = F F^T``, the optimal core for an output factor is ``U_T^T (W M P F) F^T``, and
    the optimal orthonormal ``U_T`` spans the leading eigenvectors of ``(W M P F)(W M P F)^T``.
    """
    factor = InverseFactor(normal)
    whitened = factor.right_multiply(projected)
    gram = tl.dot(whitened, tl.transpose(whitened))
    output_factor = leading_eigenvectors(gram, output_rank)
    captured = float(tl.sum(output_factor * tl.dot(gram, output_factor)))
    core = factor.right_multiply_transpose(tl.dot(tl.transpose(output_factor), whitened))
    return output_factor, core, captured


def update_output_and_core(unfolded, metric, input_factor, output_rank, n_taps):
    """Minimise over the output factor and the core jointly, for a fixed input factor.

    With ``A = M P`` and ``N = P^T M P`` (``P = kron(U_S, I_K)``), the optimal core for any
    output factor is ``U_T^T W A N^-1``, and the optimal orthonormal output factor spans the
    leading eigenvectors of ``W A N^-1 A^T W^T``.

    Returns
    -------
    output_factor : tensor of shape (I0, R0), orthonormal columns
    core : tensor of shape (R0, R1 * K)
    captured : float
        ``tr(W~ M W~^T)`` of the new model, the sum of the leading eigenvalues; the objective
        is ``tr(W M W^T) - captured``.
    """
    n_inputs, input_rank = tl.shape(input_factor)
    if metric.kind != "dense":
        weighted = metric_times_kron(metric, input_factor, n_taps)
        blocks = tl.reshape(weighted, (n_inputs, n_taps, input_rank * n_taps))
        normal = tl.reshape(
            backend.einsum("sr,skq->rkq", input_factor, blocks), (input_rank * n_taps,) * 2
        )
        return _fit_output_and_core(normal, tl.dot(unfolded, weighted), output_rank)

    # Tap-major: A = M kron(I_K, U_S) and N = kron(I_K, U_S)^T A, block row k = U_S^T A[k]
    problem = _dense_problem(unfolded, metric, n_taps)
    size = tl.shape(problem.metric)[0]
    basis = tl.reshape(
        tl.dot(tl.reshape(problem.metric, (size * n_taps, n_inputs)), input_factor),
        (size, n_taps * input_rank),
    )
    normal = tl.matmul(
        tl.transpose(input_factor), tl.reshape(basis, (n_taps, n_inputs, n_taps * input_rank))
    )
    normal = tl.reshape(normal, (n_taps * input_rank,) * 2)
    projected = tl.reshape(
        tl.dot(problem.weighted_tensor, input_factor), (tl.shape(unfolded)[0], n_taps * input_rank)
    )
    output_factor, core, captured = _fit_output_and_core(normal, projected, output_rank)
    problem.input_factor, problem.metric_basis = input_factor, basis
    return output_factor, _from_tap_major(core, n_taps), captured


def _input_rhs(unfolded, metric, output_factor, core3):
    """Right-hand side ``b[s, r] = sum_{a, k} (U_T^T W M)[a, (s, k)] G[a, r, k]``."""
    rank_out, _, n_taps = tl.shape(core3)
    weighted = metric.rmatmul(tl.dot(tl.transpose(output_factor), unfolded))
    weighted = tl.reshape(weighted, (rank_out, -1, n_taps))
    return backend.einsum("ask,ark->sr", weighted, core3)


def _dense_input_system(metric, core3, n_inputs):
    """Return the normal matrix of the input factor, of side I1 * R1."""
    _, input_rank, n_taps = tl.shape(core3)
    gram = backend.einsum("ark,aql->rqkl", core3, core3)
    blocks = tl.reshape(metric.matrix, (n_inputs, n_taps, n_inputs, n_taps))
    blocks = tl.transpose(blocks, (0, 2, 1, 3))
    system = tl.dot(
        tl.reshape(blocks, (n_inputs * n_inputs, n_taps * n_taps)),
        tl.transpose(tl.reshape(gram, (input_rank * input_rank, n_taps * n_taps))),
    )
    system = tl.reshape(system, (n_inputs, n_inputs, input_rank, input_rank))
    system = tl.reshape(tl.transpose(system, (0, 2, 1, 3)), (n_inputs * input_rank,) * 2)
    return (system + tl.transpose(system)) / 2


def _solve_diagonal(metric, core3, rhs):
    """Solve the input-factor system for a diagonal metric: one R1 x R1 system per input channel."""
    n_inputs, input_rank = tl.shape(rhs)
    n_taps = tl.shape(core3)[2]
    tap_gram = backend.einsum("ark,aqk->krq", core3, core3)
    weights = tl.reshape(metric.weights, (n_inputs, n_taps))
    systems = tl.reshape(
        tl.dot(weights, tl.reshape(tap_gram, (n_taps, input_rank * input_rank))),
        (n_inputs, input_rank, input_rank),
    )
    solution = spd_solve(systems, tl.reshape(rhs, (n_inputs, input_rank, 1)))
    return tl.reshape(solution, (n_inputs, input_rank))


class InputFactorOperator:
    """Matrix-free normal operator of the input factor for a dense metric, with a Kronecker
    preconditioner.

    A product costs ``O(R0 D^2)`` because the output factor is orthonormal, so the contraction
    with it drops out and only the core (R0 rows) meets the metric. Products run in float32,
    which is exact enough for the inexact solves: the rounding error is relative to the
    correction each iteration adds, not to the solution, and the residual the solve starts
    from is computed in float64. The preconditioner is the inverse of ``(mean diagonal tap
    block of M) (x) (sum of the diagonal tap blocks of H)``, with ``H`` the Gram matrix of the
    core's columns.
    """

    def __init__(self, problem, core):
        self.problem = problem
        rank_out, n_taps, input_rank = tl.shape(core)
        self.rank_out = rank_out
        self.n_taps = n_taps
        self.core_rows = tl.reshape(core, (rank_out * n_taps, input_rank))
        self.core_rows32 = _to_float32(self.core_rows)
        self.rank_inverse = spd_pseudo_inverse(tl.dot(tl.transpose(self.core_rows), self.core_rows))

    def contract(self, rows, core_rows=None):
        """Return ``sum_{a, k} rows[a, (k, s)] G[a, k, r]`` for tap-major ``rows`` (R0, D)."""
        core_rows = self.core_rows if core_rows is None else core_rows
        return tl.dot(tl.transpose(tl.reshape(rows, (self.rank_out * self.n_taps, -1))), core_rows)

    def __call__(self, factor):
        expanded = tl.dot(self.core_rows32, tl.transpose(_to_float32(factor)))
        product = tl.dot(tl.reshape(expanded, (self.rank_out, -1)), self.problem.metric32)
        return _to_float64(self.contract(product, self.core_rows32))

    def precondition(self, residual):
        return tl.dot(tl.dot(self.problem.channel_inverse, residual), self.rank_inverse)


def _solve_input_cg(problem, output_factor, core, input_factor, cg_rtol, cg_max_iter):
    """Run the warm-started conjugate-gradient solve of the input factor for a dense metric."""
    n_taps = problem.n_taps
    rank_out = tl.shape(output_factor)[1]
    core = _to_tap_major(core, n_taps)
    operator = InputFactorOperator(problem, core)

    # Right-hand side from the stored W M: rows (a, k) of U_T^T W M, contracted with the core
    projected = tl.dot(
        tl.transpose(output_factor),
        tl.reshape(problem.weighted_tensor, (tl.shape(output_factor)[0], -1)),
    )
    rhs = operator.contract(projected)

    # The joint update that produced the core stored M kron(I_K, U_S) for this input factor,
    # so the first residual b - A U_S = contract(U_T^T W M - G (M kron(I_K, U_S))^T) is cheap.
    residual = None
    if problem.input_factor is input_factor:
        core_matrix = tl.reshape(core, (rank_out, -1))
        residual = operator.contract(projected - tl.dot(core_matrix, tl.transpose(problem.metric_basis)))
    return conjugate_gradient(
        operator, rhs, input_factor, operator.precondition, rtol=cg_rtol, max_iter=cg_max_iter,
        reduction=CG_REDUCTION, min_iter=1, residual=residual,
    )


def update_input_factor(unfolded, metric, output_factor, core, input_factor, *, solver, cg_rtol,
                        cg_max_iter):
    """Minimise over the input factor for a fixed output factor and core.

    The objective is quadratic in ``U_S`` but does not separate over input channels, because the
    metric couples channels with taps: the normal equations form an (I1 R1) x (I1 R1) positive
    definite system, solved densely when small, block by block for a diagonal metric, and
    otherwise by preconditioned conjugate gradients warm-started from the current factor. The
    conjugate-gradient solve stops once its residual is below ``cg_rtol`` times the right-hand
    side or below :data:`CG_REDUCTION` times its first residual, after at least one iteration.

    Returns
    -------
    input_factor : tensor of shape (I1, R1), not orthonormalised
    n_cg_iter : int, the number of conjugate-gradient iterations (0 for direct solves)
    """
    n_inputs, input_rank = tl.shape(input_factor)
    rank_out = tl.shape(output_factor)[1]
    core3 = tl.reshape(core, (rank_out, input_rank, -1))

    if metric.kind == "diagonal":
        rhs = _input_rhs(unfolded, metric, output_factor, core3)
        return _solve_diagonal(metric, core3, rhs), 0
    if use_dense(solver, n_inputs * input_rank, 2 * rank_out * metric.size**2):
        rhs = _input_rhs(unfolded, metric, output_factor, core3)
        system = _dense_input_system(metric, core3, n_inputs)
        solution = spd_solve(system, tl.reshape(rhs, (-1,)))
        return tl.reshape(solution, (n_inputs, input_rank)), 0

    problem = _dense_problem(unfolded, metric, tl.shape(core3)[2])
    return _solve_input_cg(problem, output_factor, core, input_factor, cg_rtol, cg_max_iter)


def reconstruct_unfolded(output_factor, core, input_factor, n_taps):
    """Return ``U_T G kron(U_S, I_K)^T``, of shape (I0, D)."""
    rank_out = tl.shape(output_factor)[1]
    core3 = tl.reshape(core, (rank_out, tl.shape(input_factor)[1], n_taps))
    expanded = backend.einsum("ark,sr->ask", core3, input_factor)
    return tl.dot(output_factor, tl.reshape(expanded, (rank_out, -1)))
