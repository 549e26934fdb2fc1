"""Factor updates of the metric-weighted CP decomposition.

Notation: the tensor of shape (I0, I1, ..., I_{N-1}) is unfolded as ``W`` (I0, D), the metric
``M`` is (D, D), and the model is ``W~ = U_0 KR^T`` with ``KR`` the Khatri-Rao product of
``U_1, ..., U_{N-1}`` (D, R). Every update solves the normal equations of one factor with a
proximal ridge relative to their scale, which bounds each step when rank-one terms start to
cancel.
"""

import math

import tensorly as tl

from .. import _backend as backend
from .._solvers import conjugate_gradient, spd_pseudo_inverse, spd_solve, use_dense

# Reduction of the preconditioned residual that ends the conjugate-gradient solve of a factor.
# With it, on the 256x256x3x3 weight of ResNet-18's layer3.1.conv2 with its 2304x2304 input
# second moment and rank 256, each solve ran one or two iterations and 10 sweeps reached a
# relative error of 0.1369. Stopping at cg_rtol alone, the solves alternated between 0 and
# about 40 iterations and reached 0.1397.
CG_REDUCTION = 0.5


def ridge_size(system, l2_reg):
    """Return ``l2_reg`` times the mean diagonal entry of the (possibly batched) ``system``."""
    size = tl.shape(system)[-1]
    identity = tl.eye(size, **tl.context(system))
    mean_diagonal = float(tl.sum(system * identity)) / (size * max(1, math.prod(tl.shape(system)[:-2])))
    return l2_reg * mean_diagonal


def proximal_solve(system, rhs, previous, l2_reg):
    """Solve ``(system + lam I) x = rhs + lam previous`` with ``lam`` relative to the system.

    The proximal term pulls the update towards the previous factor instead of towards zero, so
    it bounds each step (the safeguard against diverging, cancelling rank-one terms) without
    biasing the fixed points: a converged model minimises the metric error itself. Each update
    still decreases the objective, since ``previous`` is a feasible point of the regularised
    problem.
    """
    lam = ridge_size(system, l2_reg)
    size = tl.shape(system)[-1]
    shifted = system + lam * tl.eye(size, **tl.context(system))
    if tl.ndim(system) == 2:
        shifted = (shifted + tl.transpose(shifted)) / 2
    return spd_solve(shifted, rhs + lam * previous)


def khatri_rao_rows(factors, n_rows_like):
    """Khatri-Rao product of ``factors`` (row index in C order), or a row of ones if none."""
    if not factors:
        rank = tl.shape(n_rows_like)[1]
        return tl.ones((1, rank), **tl.context(n_rows_like))
    if len(factors) == 1:
        return factors[0]
    return tl.tenalg.khatri_rao(factors)


def update_first_factor(unfolded, metric, factors, l2_reg):
    """Closed form of ``U_0 = W M KR (KR^T M KR)^-1`` (an R x R solve)."""
    khatri_rao = khatri_rao_rows(factors[1:], factors[0])
    weighted = metric.rmatmul(tl.transpose(khatri_rao))
    system = tl.dot(weighted, khatri_rao)
    rhs = tl.dot(weighted, tl.transpose(unfolded))
    return tl.transpose(proximal_solve(system, rhs, tl.transpose(factors[0]), l2_reg))


class _ModeProblem:
    """Normal equations of factor ``mode`` >= 1, with the other factors fixed.

    The metric's index (i_1, ..., i_{N-1}) is permuted to (i_mode, others), so the model's
    Khatri-Rao product reads ``X[i, r] * Z[o, r]`` with ``Z`` the Khatri-Rao product of the
    other factors of modes >= 1.
    """

    def __init__(self, metric, factors, mode, mode_sizes):
        self.metric = metric
        self.mode = mode
        self.mode_sizes = tuple(mode_sizes)
        self.size = mode_sizes[mode - 1]
        self.others = math.prod(mode_sizes) // self.size
        self.rank = tl.shape(factors[0])[1]
        others = [factors[k] for k in range(1, len(factors)) if k != mode]
        self.others_product = khatri_rao_rows(others, factors[0])
        self.first_gram = tl.dot(tl.transpose(factors[0]), factors[0])

    def to_mode_first(self, rows):
        """Reorder the columns of ``rows`` (n, D) to (n, I_mode, others)."""
        n_rows = tl.shape(rows)[0]
        tensor = tl.reshape(rows, (n_rows,) + self.mode_sizes)
        tensor = tl.moveaxis(tensor, self.mode, 1)
        return tl.reshape(tensor, (n_rows, self.size, self.others))

    def from_mode_first(self, tensor):
        """Inverse of :meth:`to_mode_first`: (n, I_mode, others) to (n, D)."""
        n_rows = tl.shape(tensor)[0]
        sizes = [s for k, s in enumerate(self.mode_sizes, start=1) if k != self.mode]
        tensor = tl.reshape(tensor, (n_rows, self.size, *sizes))
        tensor = tl.moveaxis(tensor, 1, self.mode)
        return tl.reshape(tensor, (n_rows, -1))

    def rhs(self, unfolded, first_factor):
        weighted = self.metric.rmatmul(tl.dot(tl.transpose(first_factor), unfolded))
        return backend.einsum("rio,or->ir", self.to_mode_first(weighted), self.others_product)

    def apply(self, factor):
        model = backend.einsum("ir,or->rio", factor, self.others_product)
        weighted = self.metric.rmatmul(self.from_mode_first(model))
        weighted = tl.dot(self.first_gram, weighted)
        return backend.einsum("rio,or->ir", self.to_mode_first(weighted), self.others_product)

    def metric_mode_first(self):
        """Return the dense metric as (I_mode, others, I_mode, others)."""
        n_modes = len(self.mode_sizes)
        tensor = tl.reshape(self.metric.matrix, self.mode_sizes + self.mode_sizes)
        order = [self.mode - 1] + [k for k in range(n_modes) if k != self.mode - 1]
        tensor = tl.transpose(tensor, order + [n_modes + k for k in order])
        return tl.reshape(tensor, (self.size, self.others, self.size, self.others))

    def dense_system(self):
        """Return the normal matrix, of side I_mode * R."""
        blocks = self.metric_mode_first()
        half = backend.einsum("aobp,pr->aobr", blocks, self.others_product)
        system = backend.einsum("aobq,or->arbq", half, self.others_product)
        system = system * tl.reshape(self.first_gram, (1, self.rank, 1, self.rank))
        return tl.reshape(system, (self.size * self.rank,) * 2)

    def block_systems(self):
        """Return the per-index R x R systems of a diagonal metric."""
        weights = self.to_mode_first(tl.reshape(self.metric.weights, (1, -1)))[0]
        blocks = backend.einsum("io,or,oq->irq", weights, self.others_product, self.others_product)
        return blocks * self.first_gram

    def kronecker_approximation(self):
        """Return (channel block, model Gram) whose Kronecker product approximates the system."""
        if self.metric.kind == "dense":
            channel = backend.einsum("aobo->ab", self.metric_mode_first()) / self.others
        else:
            channel = tl.eye(self.size, **tl.context(self.first_gram))
        model_gram = self.first_gram * tl.dot(tl.transpose(self.others_product), self.others_product)
        return channel, model_gram


def update_mode_factor(unfolded, metric, factors, mode, mode_sizes, *, l2_reg, solver, cg_rtol,
                       cg_max_iter):
    """Minimise over factor ``mode`` >= 1 for fixed other factors; return the new factor."""
    problem = _ModeProblem(metric, factors, mode, mode_sizes)
    rhs = problem.rhs(unfolded, factors[0])

    if metric.kind == "diagonal":
        column = (problem.size, problem.rank, 1)
        solution = proximal_solve(
            problem.block_systems(), tl.reshape(rhs, column), tl.reshape(factors[mode], column), l2_reg
        )
        return tl.reshape(solution, (problem.size, problem.rank))
    if use_dense(solver, problem.size * problem.rank, 2 * problem.rank * metric.size**2):
        solution = proximal_solve(
            problem.dense_system(), tl.reshape(rhs, (-1,)), tl.reshape(factors[mode], (-1,)), l2_reg
        )
        return tl.reshape(solution, (problem.size, problem.rank))

    # Matrix-free: the ridge is taken relative to the mean diagonal of the Kronecker
    # approximation of the system, which is cheap to evaluate.
    channel, model_gram = problem.kronecker_approximation()
    ridge = l2_reg * float(tl.trace(channel)) / problem.size * float(tl.trace(model_gram)) / problem.rank
    left, right = spd_pseudo_inverse(channel), spd_pseudo_inverse(model_gram)

    def precondition(residual):
        return tl.dot(tl.dot(left, residual), right)

    def apply(factor):
        return problem.apply(factor) + ridge * factor

    solution, _ = conjugate_gradient(
        apply, rhs + ridge * factors[mode], factors[mode], precondition, rtol=cg_rtol,
        max_iter=cg_max_iter, reduction=CG_REDUCTION, min_iter=1,
    )
    return solution


def normalise_columns(factor):
    """Return ``factor`` with unit-norm columns and the norms (zero columns keep norm 1)."""
    norms = tl.norm(factor, axis=0)
    safe = tl.where(norms > 0, norms, tl.ones(tl.shape(norms), **tl.context(norms)))
    return factor / safe, norms


def reconstruct_unfolded(factors):
    """Return ``U_0 KR^T``, of shape (I0, D)."""
    return tl.dot(factors[0], tl.transpose(khatri_rao_rows(factors[1:], factors[0])))
