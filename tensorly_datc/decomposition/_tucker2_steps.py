"""Block updates of the metric-weighted Tucker-2 decomposition.

Notation: the tensor is unfolded as ``W`` of shape (I0, D) with ``D = I1 * K`` (mode 1 slowest,
then the remaining modes flattened into K "taps"), the metric ``M`` is (D, D), and the model is
``W~ = U_T G kron(U_S, I_K)^T`` with ``U_T`` (I0, R0), ``U_S`` (I1, R1) and ``G`` (R0, R1 * K).
Each update minimises ``tr((W - W~) M (W - W~)^T)`` exactly over its block (up to the accuracy
of the inner solver), so the objective never increases.
"""

import tensorly as tl

from .. import _backend as backend
from .._solvers import conjugate_gradient, spd_pseudo_inverse, spd_solve, use_dense
from ._common import leading_eigenvectors, leading_left_singular_vectors


def metric_times_kron(metric, input_factor, n_taps):
    """Return ``M @ kron(input_factor, I_K)``, of shape (D, R1 * K)."""
    n_inputs, rank = tl.shape(input_factor)
    size = metric.size
    if metric.kind == "dense":
        blocks = tl.reshape(metric.matrix, (size, n_inputs, n_taps))
        product = backend.einsum("dsk,sr->drk", blocks, input_factor)
        return tl.reshape(product, (size, rank * n_taps))
    # kron(U_S, I_K), built by broadcasting (TensorLy's torch kron rejects column slices).
    identity = tl.eye(n_taps, **tl.context(input_factor))
    expanded = tl.reshape(
        input_factor[:, None, :, None] * identity[None, :, None, :], (size, rank * n_taps)
    )
    return tl.transpose(metric.rmatmul(tl.transpose(expanded)))


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
    weighted = metric_times_kron(metric, input_factor, n_taps)
    blocks = tl.reshape(weighted, (n_inputs, n_taps, input_rank * n_taps))
    normal = tl.reshape(
        backend.einsum("sr,skq->rkq", input_factor, blocks), (input_rank * n_taps, input_rank * n_taps)
    )
    normal = (normal + tl.transpose(normal)) / 2
    projected = tl.dot(unfolded, weighted)
    solved = spd_solve(normal, tl.transpose(projected))
    n_outputs = tl.shape(unfolded)[0]
    if n_outputs > input_rank * n_taps:
        # Tall case: the I0 x I0 Gram matrix has rank at most R1 K, so take the leading
        # vectors from W A N^{-1/2} (I0 x R1 K) instead, at O(I0 (R1 K)^2).
        whitened = tl.dot(projected, _inverse_square_root(normal))
        output_factor = leading_left_singular_vectors(whitened, output_rank)
        captured_matrix = tl.dot(tl.transpose(output_factor), whitened)
        captured = float(tl.sum(captured_matrix * captured_matrix))
    else:
        gram = tl.dot(projected, solved)
        output_factor = leading_eigenvectors(gram, output_rank)
        captured = float(tl.sum(output_factor * tl.dot(gram, output_factor)))
    core = tl.dot(tl.transpose(output_factor), tl.transpose(solved))
    return output_factor, core, captured


def _inverse_square_root(matrix):
    """Return ``matrix^{-1/2}`` of a symmetric positive definite matrix (small eigenvalues floored)."""
    eigenvalues, eigenvectors = tl.eigh(matrix)
    eigenvalues = tl.clip(eigenvalues, tl.max(eigenvalues) * 1e-14, None)
    return tl.dot(eigenvectors / tl.sqrt(eigenvalues), tl.transpose(eigenvectors))


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
    """Matrix-free normal operator of the input factor, with a Kronecker preconditioner.

    A product costs ``O(R0 D^2)`` because the output factor is orthonormal, so the contraction
    with it drops out and only the core (R0 rows) meets the metric.
    """

    def __init__(self, metric, core3, n_inputs):
        self.metric = metric
        self.core3 = core3
        rank_out, input_rank, n_taps = tl.shape(core3)
        self.rank_out = rank_out
        self.n_taps = n_taps

        # Preconditioner: K * (mean diagonal tap block of M) (x) (mean diagonal tap block of H).
        tap_gram = backend.einsum("ark,aqk->rq", core3, core3) / n_taps
        if metric.kind == "dense":
            blocks = tl.reshape(metric.matrix, (n_inputs, n_taps, n_inputs, n_taps))
            channel_block = backend.einsum("akbk->ab", blocks) / n_taps
        else:
            channel_block = tl.diag(tl.mean(tl.reshape(metric.weights, (n_inputs, n_taps)), axis=1))
        self.channel_inverse = spd_pseudo_inverse(channel_block)
        self.rank_inverse = spd_pseudo_inverse(tap_gram) / n_taps

    def __call__(self, factor):
        expanded = backend.einsum("ark,sr->ask", self.core3, factor)
        weighted = self.metric.rmatmul(tl.reshape(expanded, (self.rank_out, -1)))
        weighted = tl.reshape(weighted, (self.rank_out, -1, self.n_taps))
        return backend.einsum("ask,ark->sr", weighted, self.core3)

    def precondition(self, residual):
        return tl.dot(tl.dot(self.channel_inverse, residual), self.rank_inverse)


def update_input_factor(unfolded, metric, output_factor, core, input_factor, *, solver, cg_rtol,
                        cg_max_iter):
    """Minimise over the input factor for a fixed output factor and core.

    The objective is quadratic in ``U_S`` but does not separate over input channels, because the
    metric couples channels with taps: the normal equations form an (I1 R1) x (I1 R1) positive
    definite system, solved densely when small, block by block for a diagonal metric, and
    otherwise by preconditioned conjugate gradients warm-started from the current factor.

    Returns
    -------
    input_factor : tensor of shape (I1, R1), not orthonormalised
    n_cg_iter : int, the number of conjugate-gradient iterations (0 for direct solves)
    """
    n_inputs, input_rank = tl.shape(input_factor)
    rank_out = tl.shape(output_factor)[1]
    core3 = tl.reshape(core, (rank_out, input_rank, -1))
    rhs = _input_rhs(unfolded, metric, output_factor, core3)

    if metric.kind == "diagonal":
        return _solve_diagonal(metric, core3, rhs), 0
    if use_dense(solver, n_inputs * input_rank, 2 * rank_out * metric.size**2):
        system = _dense_input_system(metric, core3, n_inputs)
        solution = spd_solve(system, tl.reshape(rhs, (-1,)))
        return tl.reshape(solution, (n_inputs, input_rank)), 0

    operator = InputFactorOperator(metric, core3, n_inputs)
    return conjugate_gradient(
        operator, rhs, input_factor, operator.precondition, rtol=cg_rtol, max_iter=cg_max_iter
    )


def reconstruct_unfolded(output_factor, core, input_factor, n_taps):
    """Return ``U_T G kron(U_S, I_K)^T``, of shape (I0, D)."""
    rank_out = tl.shape(output_factor)[1]
    core3 = tl.reshape(core, (rank_out, tl.shape(input_factor)[1], n_taps))
    expanded = backend.einsum("ark,sr->ask", core3, input_factor)
    return tl.dot(output_factor, tl.reshape(expanded, (rank_out, -1)))
