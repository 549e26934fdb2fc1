"""Block updates of the metric-weighted Tucker-2 decomposition.

Notation: the tensor is unfolded as ``W`` of shape (I0, D) with ``D = I1 * K`` (mode 1 slowest,
then the remaining modes flattened into K "taps"), the metric ``M`` is (D, D), and the model is
``W~ = U_T G kron(U_S, I_K)^T`` with ``U_T`` (I0, R0), ``U_S`` (I1, R1) and ``G`` (R0, R1 * K).
Each update minimises ``tr((W - W~) M (W - W~)^T)`` exactly over its block (up to the accuracy
of the inner solver), so the objective never increases.

For a dense metric the updates work in tap-major order, which indexes the D columns as (k, s)
instead of (s, k). There ``kron(U_S, I_K)`` becomes ``kron(I_K, U_S)``, a block-diagonal
matrix, so every product with it is one matrix product with ``U_S``. The largest product of a
sweep, ``M kron(I_K, U_S)`` (the "basis"), is not recomputed: the conjugate-gradient solve for
the input factor forms it for each search direction, and the basis of the solution is their
running combination (see :class:`_DenseProblem`).
"""

import functools
import weakref

import numpy as np
import tensorly as tl

from .. import _backend as backend
from .._solvers import InverseFactor, conjugate_gradient, spd_pseudo_inverse, spd_solve, use_dense
from ._common import leading_eigenvectors

# Reduction of the preconditioned residual that ends the conjugate-gradient solve of a sweep.
# A loose solve costs little progress per sweep. Take the 512x512x3x3 weight of ResNet-18's
# layer4.1.conv2, its 4608x4608 input second moment and ranks (256, 256): sweeps of one and of
# eight iterations reached relative errors of 0.12675 and 0.12670 after 10 sweeps. Each
# iteration costs a product with the metric, as much as a third of a sweep.
CG_REDUCTION = 0.5

# The basis is recomputed once the relative changes of the input factor, summed over the sweeps
# since its last full computation, exceed this. The basis is linear in the factor, so its float32
# increments then sum to about its own size, and their rounding error to an estimated 1e-7 of it.
BASIS_REFRESH = 1.0

# The input factor X the basis is kept for is not orthonormal, and the normal matrix of the joint
# update has up to cond(X)^2 times the condition number of the metric. Beyond this condition
# number of X, the basis is recomputed for the orthonormal factor instead.
MAX_FACTOR_CONDITION = 100.0

# Requested conjugate-gradient tolerance under which the input-factor solves switch from float32
# to float64 products for good. Float32 rounding (about 6e-8) in the basis limits the relative
# accuracy of the sweeps to about 1e-7, and the driver requests tolerances this small only once a
# sweep improves the error by less than about 1e-4 relatively.
FLOAT32_MIN_RTOL = 1e-5

# While the solves run in float32, the joint update does too, unless the smallest pivot of the
# Cholesky factor of its normal matrix is below this fraction of the largest. Such a matrix has a
# condition number above 1e6, where float32 factors lose most of their digits, and the update
# is redone in float64. A sweep that the float32 update makes worse sends the driver to float64
# for good (see FLOAT32_MIN_RTOL).
FLOAT32_MIN_PIVOT_RATIO = 1e-3

# Arrays derived from a dense metric for one decomposition, keyed by the metric object (which
# the decomposition creates for each call), so they are freed with it.
# NOTE: the step functions receive only (unfolded, metric), so this cache replaces a work object
# that the alternating driver could create and pass to them.
_DENSE_PROBLEMS = weakref.WeakKeyDictionary()


class _DenseProblem:
    """The arrays a dense-metric decomposition reuses in every sweep, in tap-major order.

    The basis ``M kron(I_K, X)`` is kept for an input factor ``X`` that is not orthonormalised:
    the alternating driver orthonormalises each new input factor (``Q R = X``), and instead of
    recomputing the basis for ``Q``, the updates keep working with ``X`` and return the core in
    ``Q``'s coordinates, ``G_Q = G_X kron(I_K, R^T)``.

    Attributes
    ----------
    matrix : tensor of shape (D, D)
        The metric, in its own (channel-major) order.
    metric32 : tensor of shape (D, D)
        The metric in tap-major order and float32, for the products of the search directions.
        Formed on first use, so direct solves never build it.
    weighted_tensor, weighted_tensor32 : tensor of shape (I0 * K, I1)
        ``W M`` in tap-major order, rows (i0, k), in float64 and (on first use) in float32.
    channel_inverse : tensor of shape (I1, I1)
        Pseudo-inverse of the mean diagonal tap block of ``M``, for the preconditioner.
    factor, basis, rotation, core : tensor or None
        After a joint update: ``X``, ``M kron(I_K, X)`` (D, K * R1), ``R`` with ``Q R = X`` for
        the orthonormal factor ``Q`` the driver holds, and the core for ``X`` (R0, K, R1).
    driver_factor, driver_core : tensor or None
        The ``Q`` and core (in ``Q``'s coordinates) of that update, as handed to the driver.
    pending : tuple or None
        ``(X, basis)`` from the last input-factor solve, before the driver orthonormalises X.
    drift : float
        Sum of the relative changes of the input factor since the basis was computed exactly.
    precise : bool
        Whether the input-factor solves use float64 products (see :data:`FLOAT32_MIN_RTOL`).
    """

    def __init__(self, unfolded, metric, n_taps):
        n_outputs, size = tl.shape(unfolded)
        n_inputs = size // n_taps
        self.unfolded = unfolded
        self.n_taps = n_taps
        self.n_inputs = n_inputs
        self.matrix = metric.matrix

        weighted = tl.reshape(metric.rmatmul(unfolded), (n_outputs, n_inputs, n_taps))
        weighted = tl.transpose(weighted, (0, 2, 1))
        self.weighted_tensor = tl.reshape(weighted, (n_outputs * n_taps, n_inputs))
        tap_blocks = tl.reshape(metric.matrix, (n_inputs, n_taps, n_inputs, n_taps))
        self.channel_inverse = spd_pseudo_inverse(backend.einsum("akbk->ab", tap_blocks) / n_taps)
        self.factor = self.basis = self.rotation = self.core = None
        self.driver_factor = self.driver_core = self.pending = None
        self.drift = 0.0
        self.precise = False
        self.iterative = False

    @functools.cached_property
    def metric32(self):
        n_inputs, n_taps = self.n_inputs, self.n_taps
        blocks = tl.transpose(tl.reshape(self.matrix, (n_inputs, n_taps, n_inputs, n_taps)), (1, 0, 3, 2))
        if isinstance(blocks, np.ndarray):
            return np.ascontiguousarray(blocks, dtype=np.float32).reshape((n_inputs * n_taps,) * 2)
        # One copy that reorders and converts: converting first took twice as long (torch 2.14,
        # side 4608, CPU), and allocated a float32 copy in the channel-major order as well.
        reordered = backend.torch.empty(blocks.shape, dtype=backend.torch.float32, device=blocks.device)
        reordered.copy_(blocks)
        return reordered.reshape((n_inputs * n_taps,) * 2)

    @functools.cached_property
    def weighted_tensor32(self):
        return _to_float32(self.weighted_tensor)

    def exact_basis(self, factor):
        """Return ``M kron(I_K, factor)`` in tap-major order, (D, K * R1), in float64."""
        n_inputs, n_taps = self.n_inputs, self.n_taps
        size = n_inputs * n_taps
        rows = tl.reshape(self.matrix, (n_inputs, n_taps, size))
        # (kron(U, I_K)^T M)[(r, k), :] = U^T M[(s, k), :] for each tap k; M is symmetric.
        half = tl.stack([tl.dot(tl.transpose(factor), rows[:, k]) for k in range(n_taps)])
        half = tl.reshape(half, (n_taps, -1, n_inputs, n_taps))
        return tl.reshape(tl.transpose(half, (3, 2, 0, 1)), (size, -1))

    def working_basis(self, factor):
        """Return ``M kron(I_K, factor)`` in the precision of the input-factor solves."""
        return self.exact_basis(factor) if self.precise else self.basis32(factor)

    def basis32(self, factor):
        """Return ``M kron(I_K, factor)`` in tap-major order, (D, K * R1), in float32."""
        size = tl.shape(self.metric32)[0]
        basis = tl.dot(tl.reshape(self.metric32, (size * self.n_taps, -1)), _to_float32(factor))
        return tl.reshape(basis, (size, -1))

    def joint_coordinates(self, input_factor):
        """Return ``(X, basis, R)`` with ``input_factor @ R = X`` for a joint update.

        After a conjugate-gradient solve, ``X`` is its solution when ``input_factor``
        orthonormalises it, with the basis the solve built. When that factor has drifted too
        far, ``X`` is ``input_factor`` with a basis recomputed in the precision of the solves.
        Without a solve before, ``X`` is ``input_factor`` with a basis in the precision of the
        solves that will follow: float64 for direct solves, so that they keep float64 accuracy.
        """
        identity = tl.eye(tl.shape(input_factor)[1], **tl.context(input_factor))
        if self.pending is None:
            self.drift = 0.0
            basis = self.working_basis(input_factor) if self.iterative else self.exact_basis(input_factor)
            return input_factor, basis, identity

        factor, basis = self.pending
        self.pending = None
        rotation = tl.dot(tl.transpose(input_factor), factor)
        mismatch = float(tl.norm(tl.dot(input_factor, rotation) - factor))
        eigenvalues = tl.eigh(tl.dot(tl.transpose(factor), factor))[0]
        condition_squared = float(eigenvalues[-1]) / max(float(eigenvalues[0]), 1e-300)
        same_span = mismatch <= 1e-10 * float(tl.norm(factor))
        if same_span and condition_squared <= MAX_FACTOR_CONDITION**2 and self.drift <= BASIS_REFRESH:
            return factor, basis, rotation
        self.drift = 0.0
        return input_factor, self.working_basis(input_factor), identity

    def input_coordinates(self, input_factor, core):
        """Return ``(X, basis, R, core for X)`` for an input-factor solve, the basis in the
        precision of the solves."""
        if self.driver_factor is input_factor and self.driver_core is core:
            basis = self.basis
            if not self.precise:
                basis = _to_float32(basis)
            elif not _is_float64(basis):
                basis = self.exact_basis(self.factor)
            return self.factor, basis, self.rotation, self.core
        self.drift = 0.0
        identity = tl.eye(tl.shape(input_factor)[1], **tl.context(input_factor))
        core = _to_tap_major(core, self.n_taps)
        return input_factor, self.working_basis(input_factor), identity, core


def _to_float32(array):
    if isinstance(array, np.ndarray):
        return array.astype(np.float32)
    return array.to(backend.torch.float32)


def _is_float64(array):
    if isinstance(array, np.ndarray):
        return array.dtype == np.float64
    return array.dtype == backend.torch.float64


def _to_float64(array):
    if isinstance(array, np.ndarray):
        return array.astype(np.float64)
    return array.to(backend.torch.float64)


def _cached_problem(unfolded, metric, n_taps):
    """Return the cached :class:`_DenseProblem` of ``metric`` for ``unfolded``, or None."""
    problem = _DENSE_PROBLEMS.get(metric)
    if problem is None or problem.unfolded is not unfolded or problem.n_taps != n_taps:
        return None
    return problem


def _dense_problem(unfolded, metric, n_taps):
    """Return the cached :class:`_DenseProblem` of ``metric``, building it for a new ``unfolded``."""
    problem = _cached_problem(unfolded, metric, n_taps)
    if problem is None:
        problem = _DenseProblem(unfolded, metric, n_taps)
        _DENSE_PROBLEMS[metric] = problem
    return problem


def solves_in_float32(unfolded, metric, n_taps):
    """Return whether the input-factor solves of this decomposition still run in float32."""
    problem = _cached_problem(unfolded, metric, n_taps)
    return problem is not None and problem.iterative and not problem.precise


def squared_norm(unfolded, metric, n_taps):
    """Return ``tr(W M W^T)`` for the unfolded weight ``W``.

    For a dense metric it comes from the ``W M`` that the updates keep, which saves a product
    of cost ``I0 D^2``.
    """
    if metric.kind != "dense":
        return float(metric.quadratic(unfolded))
    problem = _dense_problem(unfolded, metric, n_taps)
    n_outputs = tl.shape(unfolded)[0]
    tap_major = tl.transpose(tl.reshape(unfolded, (n_outputs, problem.n_inputs, n_taps)), (0, 2, 1))
    return float(tl.sum(tl.reshape(tap_major, tl.shape(problem.weighted_tensor)) * problem.weighted_tensor))


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


def _fit_output_and_core(normal, projected, output_rank, min_pivot_ratio=None):
    """Return the optimal (U_T, core, captured) for the normal matrix ``N`` and ``W M P``.

    With ``N = F F^T``, the optimal core for an output factor is ``U_T^T (W M P F) F^T``, and
    the optimal orthonormal ``U_T`` spans the leading eigenvectors of ``(W M P F)(W M P F)^T``.
    Only the lower triangle of ``normal`` is read. With ``min_pivot_ratio``, returns None
    instead when the factorisation fails or its pivots span a wider ratio.
    """
    factor = InverseFactor(normal)
    if min_pivot_ratio is not None:
        if factor.lower is None:
            return None
        pivots = tl.diag(factor.lower)
        if float(tl.min(pivots)) < min_pivot_ratio * float(tl.max(pivots)):
            return None
    whitened = factor.right_multiply(projected)
    gram = tl.dot(whitened, tl.transpose(whitened))
    output_factor = leading_eigenvectors(gram, output_rank)
    captured = float(tl.sum(output_factor * tl.dot(gram, output_factor)))
    core = factor.right_multiply_transpose(tl.dot(tl.transpose(output_factor), whitened))
    return output_factor, core, captured


def update_output_and_core(unfolded, metric, input_factor, output_rank, n_taps, solver="auto"):
    """Minimise over the output factor and the core jointly, for a fixed input factor.

    With ``A = M P`` and ``N = P^T M P`` (``P = kron(U_S, I_K)``), the optimal core for any
    output factor is ``U_T^T W A N^-1``, and the optimal orthonormal output factor spans the
    leading eigenvectors of ``W A N^-1 A^T W^T``. ``solver`` is the input-factor solver of the
    decomposition; with a dense metric, it sets the precision of the first update.

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

    problem = _dense_problem(unfolded, metric, n_taps)
    if problem.factor is None:
        problem.iterative = _solved_iteratively(solver, metric, n_inputs, input_rank, output_rank)
    return _update_dense_output_and_core(problem, input_factor, output_rank)


def _solved_iteratively(solver, metric, n_inputs, input_rank, output_rank):
    """Return whether the input factor of a dense metric is solved by conjugate gradients."""
    return not use_dense(solver, n_inputs * input_rank, 2 * output_rank * metric.size**2)


def _update_dense_output_and_core(problem, input_factor, output_rank):
    """Run the joint update for a dense metric, in the coordinates of :class:`_DenseProblem`."""
    n_taps = problem.n_taps
    input_rank = tl.shape(input_factor)[1]
    factor, basis, rotation = problem.joint_coordinates(input_factor)

    n_outputs = tl.shape(problem.weighted_tensor)[0] // n_taps
    fitted = None
    if not problem.precise and not _is_float64(basis):
        normal = _normal_lower_blocks(factor, basis, n_taps, float64=False)
        projected = tl.dot(problem.weighted_tensor32, _to_float32(factor))
        projected = tl.reshape(projected, (n_outputs, n_taps * input_rank))
        fitted = _fit_output_and_core(normal, projected, output_rank, min_pivot_ratio=FLOAT32_MIN_PIVOT_RATIO)
        if fitted is not None:
            output_factor, core, captured = fitted
            output_factor, core = _to_float64(output_factor), _to_float64(core)
    if fitted is None:
        normal = _normal_lower_blocks(factor, basis, n_taps)
        projected = tl.reshape(tl.dot(problem.weighted_tensor, factor), (n_outputs, n_taps * input_rank))
        output_factor, core, captured = _fit_output_and_core(normal, projected, output_rank)

    # The driver keeps the orthonormal factor Q = X R^-1, for which the core is G kron(I_K, R^T)
    core = tl.reshape(core, (output_rank, n_taps, input_rank))
    rotated = tl.dot(tl.reshape(core, (-1, input_rank)), tl.transpose(rotation))
    rotated = tl.reshape(rotated, (output_rank, n_taps, input_rank))
    driver_core = _from_tap_major(rotated, n_taps)
    problem.factor, problem.basis, problem.rotation, problem.core = factor, basis, rotation, core
    problem.driver_factor, problem.driver_core = input_factor, driver_core
    return output_factor, driver_core, captured


def _normal_lower_blocks(factor, basis, n_taps, float64=True):
    """Return ``N = kron(I_K, X)^T basis`` (tap-major), with only its lower block triangle set.

    Block (k, l) of ``N`` is ``X^T basis[k, l]``; the blocks above the diagonal are left
    unset, since the factorisation of ``N`` reads its lower triangle only. The products run in
    the dtype of ``basis``; ``N`` is returned in float64, or in that dtype when ``float64`` is
    False.
    """
    n_inputs, input_rank = tl.shape(factor)
    side = n_taps * input_rank
    transposed = tl.transpose(factor if factor.dtype == basis.dtype else _to_float32(factor))
    blocks = tl.reshape(basis, (n_taps, n_inputs, side))
    if isinstance(factor, np.ndarray):
        normal = np.empty((side, side), dtype=np.float64 if float64 else basis.dtype)
    else:
        dtype = backend.torch.float64 if float64 else basis.dtype
        normal = backend.torch.empty((side, side), dtype=dtype, device=factor.device)
    for k in range(n_taps):
        rows = slice(k * input_rank, (k + 1) * input_rank)
        normal[rows, : rows.stop] = tl.dot(transposed, blocks[k][:, : rows.stop])
    return normal


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

    The product with a direction ``V`` forms ``M kron(I_K, V)``, the auxiliary output that the
    solver combines into the basis of the solution, and contracts it with the core twice. It
    costs ``O(R1 D^2)``, because the orthonormal output factor drops out. Products
    run in float32 until the driver asks for tolerances near float32 round-off (see
    :data:`FLOAT32_MIN_RTOL`), then in float64. The preconditioner is the inverse of ``(mean
    diagonal tap block of M) (x) (sum of the diagonal tap blocks of H)``, with ``H`` the Gram
    matrix of the core's columns.
    """

    def __init__(self, problem, core):
        self.problem = problem
        rank_out, n_taps, input_rank = tl.shape(core)
        self.rank_out = rank_out
        self.n_taps = n_taps
        self.core_rows = tl.reshape(core, (rank_out * n_taps, input_rank))
        self.rank_inverse = spd_pseudo_inverse(tl.dot(tl.transpose(self.core_rows), self.core_rows))
        # The core in the precision of the products
        self.working_rows = self.core_rows if problem.precise else _to_float32(self.core_rows)
        self.working_matrix = tl.reshape(self.working_rows, (rank_out, -1))

    def contract(self, rows, core_rows=None):
        """Return ``sum_{a, k} rows[a, (k, s)] G[a, k, r]`` for tap-major ``rows`` (R0, D)."""
        core_rows = self.core_rows if core_rows is None else core_rows
        return tl.dot(tl.transpose(tl.reshape(rows, (self.rank_out * self.n_taps, -1))), core_rows)

    def model(self, basis):
        """Return ``G basis^T`` (R0, D) in float64, for the basis of a factor."""
        return _to_float64(tl.dot(self.working_matrix, tl.transpose(basis)))

    def __call__(self, factor):
        basis = self.problem.working_basis(factor)
        image = self.contract(tl.dot(self.working_matrix, tl.transpose(basis)), self.working_rows)
        return _to_float64(image), basis

    def precondition(self, residual):
        return tl.dot(tl.dot(self.problem.channel_inverse, residual), self.rank_inverse)


def _solve_input_cg(problem, output_factor, core, input_factor, cg_rtol, cg_max_iter):
    """Run the warm-started conjugate-gradient solve of the input factor for a dense metric.

    The solve runs for the core in the coordinates of the kept factor ``X = Q R``, where the
    objective is ``f(V R^-1)`` of the driver's, so its solution times ``R^-1`` is returned.
    """
    if cg_rtol < FLOAT32_MIN_RTOL:
        problem.precise = True
    factor, basis, rotation, core = problem.input_coordinates(input_factor, core)
    operator = InputFactorOperator(problem, core)

    # Right-hand side from the stored W M: rows (a, k) of U_T^T W M, contracted with the core
    projected = tl.dot(
        tl.transpose(output_factor),
        tl.reshape(problem.weighted_tensor, (tl.shape(output_factor)[0], -1)),
    )
    rhs = operator.contract(projected)

    # First residual b - A X = contract(U_T^T W M - G basis^T). The solve then updates the basis
    # in place, which is safe: the next joint update takes its result or recomputes it.
    residual = operator.contract(projected - operator.model(basis))
    solution, n_iter, solution_basis = conjugate_gradient(
        operator, rhs, factor, operator.precondition, rtol=cg_rtol, max_iter=cg_max_iter,
        reduction=CG_REDUCTION, min_iter=1, residual=residual, auxiliary=basis,
    )
    problem.pending = (solution, solution_basis)
    problem.drift += float(tl.norm(solution - factor)) / float(tl.norm(factor))
    # V R^-1 = (R^-T V^T)^T
    return tl.transpose(tl.solve(tl.transpose(rotation), tl.transpose(solution))), n_iter


def update_input_factor(unfolded, metric, output_factor, core, input_factor, *, solver, cg_rtol,
                        cg_max_iter):
    """Minimise over the input factor for a fixed output factor and core.

    The objective is quadratic in ``U_S`` but does not separate over input channels, because the
    metric couples channels with taps: the normal equations form an (I1 R1) x (I1 R1) positive
    definite system, solved densely when small, block by block for a diagonal metric, and
    otherwise by preconditioned conjugate gradients warm-started from the current factor. The
    conjugate-gradient solve stops, after at least one iteration, once its residual is below
    ``cg_rtol`` times the right-hand side or its preconditioned residual below
    :data:`CG_REDUCTION` times the first one. Its products with the metric run in float32 while
    ``cg_rtol`` is at least :data:`FLOAT32_MIN_RTOL`.

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
    if not _solved_iteratively(solver, metric, n_inputs, input_rank, rank_out):
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
