"""Metric-weighted CP (PARAFAC) decomposition: the function and its class counterpart."""

import math
import warnings

import tensorly as tl
from tensorly.cp_tensor import CPTensor
from tensorly.decomposition._base_decomposition import DecompositionMixin
from tensorly.decomposition._cp import initialize_cp

from .. import _backend as backend
from .._solvers import check_solver
from ..metric import as_metric, kronecker_approximation
from . import _common as common
from ._cp_steps import (
    normalise_columns,
    proximal_solve,
    reconstruct_unfolded,
    update_first_factor,
    update_mode_factor,
)

__all__ = ["weighted_parafac", "WeightedCP"]


def _clip_rank(rank, shape):
    """Clip ``rank`` to the largest CP rank a tensor of ``shape`` can have, with a warning.

    Every tensor is the sum of one rank-one term per index of all its modes but the largest,
    so its CP rank is at most the product of those mode sizes. A larger rank only adds cost.
    """
    limit = math.prod(shape) // max(shape)
    if rank > limit:
        warnings.warn(
            f"rank {rank} requested, but every tensor of shape {shape} has a CP rank of at most "
            f"{limit} (the product of its mode sizes but the largest); using {limit}",
            stacklevel=4,
        )
        return limit
    return rank


def _check_init(init, shape, rank):
    if isinstance(init, str):
        if init not in common.INIT_NAMES:
            raise ValueError(
                f"init must be one of {common.INIT_NAMES} or a CPTensor; got {init!r}"
            )
        return
    try:
        _, factors = init
        factors = list(factors)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"init must be one of {common.INIT_NAMES} or a (weights, factors) CPTensor; "
            f"got {type(init).__name__}"
        ) from error
    if len(factors) != len(shape):
        raise ValueError(f"init must hold {len(shape)} factors; got {len(factors)}")
    weights = init[0]
    common.check_init_finite([weights] + factors)
    if weights is not None and tuple(tl.shape(weights)) != (rank,):
        raise ValueError(
            f"init weights must have shape ({rank},); got {tuple(tl.shape(weights))}"
        )
    for mode, factor in enumerate(factors):
        if tuple(tl.shape(factor)) != (shape[mode], rank):
            raise ValueError(
                f"init factor of mode {mode} must have shape {(shape[mode], rank)}; "
                f"got {tuple(tl.shape(factor))}"
            )


def _initial_factors(init, tensor, metric, rank, random_state):
    """Return starting factors (the first one carrying the weights)."""
    if not isinstance(init, str):
        weights, factors = init
        factors = [backend.to_compute(f, tensor) for f in factors]
        if weights is not None:
            factors[0] = factors[0] * backend.to_compute(weights, tensor)
        return factors
    if init != "whitened":
        return _scaled_to(tensor, _tensorly_start(tensor, rank, init, random_state))

    # Whitened start: CP-SVD start of the tensor whitened on mode 1 (and on mode 2 for a
    # 3-way tensor) by a Kronecker approximation of the metric, mapped back.
    shape = tuple(tl.shape(tensor))
    first, rest = kronecker_approximation(metric, (shape[1], math.prod(shape[2:])))
    roots = [first] + ([rest] if len(shape) == 3 else [None] * (len(shape) - 2))
    whitened, inverse_roots = tensor, []
    for mode, matrix in enumerate(roots, start=1):
        if matrix is None:
            inverse_roots.append(None)
            continue
        eigenvalues, eigenvectors = tl.eigh(matrix)
        eigenvalues = tl.clip(eigenvalues, tl.max(eigenvalues) * 1e-14, None)
        root = tl.dot(eigenvectors * tl.sqrt(eigenvalues), tl.transpose(eigenvectors))
        inverse_roots.append(tl.dot(eigenvectors / tl.sqrt(eigenvalues), tl.transpose(eigenvectors)))
        whitened = tl.tenalg.mode_dot(whitened, root, mode)
    factors = _scaled_to(whitened, _tensorly_start(whitened, rank, "svd", random_state))
    for mode, inverse_root in enumerate(inverse_roots, start=1):
        if inverse_root is not None:
            factors[mode] = tl.dot(inverse_root, factors[mode])
    return factors


def _scaled_to(tensor, factors):
    """Scale the first factor so that the start has the norm of ``tensor``.

    TensorLy's random start draws its columns in [0, 1) whatever the scale of the tensor; with
    the proximal term pulling towards the start, that would make the result depend on the
    tensor's scale.
    """
    norm = float(tl.norm(tl.cp_to_tensor((None, factors))))
    target = float(tl.norm(tensor))
    if norm > 0 and target > 0:
        factors[0] = factors[0] * (target / norm)
    return factors


def _tensorly_start(tensor, rank, init, random_state):
    """Return TensorLy's CP start, which has random columns for a rank above a mode size.

    TensorLy's SVD start scales the first factor's singular vectors by the singular values
    but draws the added columns in [0, 1), so their share of the start would depend on the
    scale of the tensor. Each added column is rescaled to the mean norm of the singular-vector
    columns of its factor, which makes the start, and so the result, scale-equivariant.
    """
    with warnings.catch_warnings():
        # TensorLy warns that it clips the SVD, then fills the missing columns at random.
        warnings.filterwarnings("ignore", message="Trying to compute SVD", category=UserWarning)
        factors = list(initialize_cp(tensor, rank, init=init, random_state=random_state)[1])
    if init != "svd":
        return factors
    for mode, factor in enumerate(factors):
        n_singular = tl.shape(factor)[0]
        if n_singular >= rank:
            continue
        singular_norms = tl.norm(factor[:, :n_singular], axis=0)
        added_norms = tl.norm(factor[:, n_singular:], axis=0)
        target = float(tl.mean(singular_norms))
        if target > 0 and float(tl.min(added_norms)) > 0:
            added = factor[:, n_singular:] * (target / added_norms)
            factors[mode] = tl.concatenate([factor[:, :n_singular], added], axis=1)
    return factors


def _move_norms_to_first(factors, mode):
    """Normalise the columns of factor ``mode`` and scale the first factor to compensate."""
    factors[mode], norms = normalise_columns(factors[mode])
    factors[0] = factors[0] * norms


def _frobenius_sweep(tensor, factors, l2_reg):
    """One ALS sweep over every mode of ``tensor`` in the Frobenius norm."""
    rank = tl.shape(factors[0])[1]
    for mode in range(len(factors)):
        gram = tl.ones((rank, rank), **tl.context(factors[0]))
        for other, factor in enumerate(factors):
            if other != mode:
                gram = gram * tl.dot(tl.transpose(factor), factor)
        mttkrp = tl.tenalg.unfolding_dot_khatri_rao(tensor, (None, factors), mode)
        solution = proximal_solve(gram, tl.transpose(mttkrp), tl.transpose(factors[mode]), l2_reg)
        factors[mode] = tl.transpose(solution)
        if mode > 0:
            _move_norms_to_first(factors, mode)
    return factors


def _whiten(tensor, factors, metric):
    if metric.kind == "identity":
        return tensor, factors, None
    roots, inverse_roots = metric.square_roots()
    factors = list(factors)
    for mode, root in enumerate(roots, start=1):
        if root is not None:
            tensor = tl.tenalg.mode_dot(tensor, root, mode)
            factors[mode] = tl.dot(root, factors[mode])
    return tensor, factors, inverse_roots


def _run(tensor, metric, factors, options):
    """Alternate the factor updates, keeping the best model; return it and the error history."""
    shape = tuple(tl.shape(tensor))
    separable = metric.kind in ("identity", "kronecker")
    if separable:
        # For identity and Kronecker metrics the metric error is the Frobenius error of the
        # whitened tensor, so plain ALS there solves the weighted problem exactly.
        tensor, factors, inverse_roots = _whiten(tensor, factors, metric)
        work_metric = None
    else:
        work_metric = metric
    unfolded = tl.reshape(tensor, (shape[0], -1))
    norm_squared = float(tl.sum(unfolded * unfolded)) if separable else float(metric.quadratic(unfolded))
    cg_rtol = 1e-4

    def error_of(factors):
        residual = unfolded - reconstruct_unfolded(factors)
        squared = float(tl.sum(residual * residual)) if separable else float(metric.quadratic(residual))
        return math.sqrt(max(squared, 0.0) / norm_squared) if norm_squared > 0 else 0.0

    def sweep(factors, cg_rtol):
        if separable:
            return _frobenius_sweep(tensor, factors, options["l2_reg"])
        for mode in range(1, len(factors)):
            factors[mode] = update_mode_factor(
                unfolded, work_metric, factors, mode, shape[1:], l2_reg=options["l2_reg"],
                solver=options["solver"], cg_rtol=cg_rtol, cg_max_iter=options["cg_max_iter"],
            )
            _move_norms_to_first(factors, mode)
        factors[0] = update_first_factor(unfolded, work_metric, factors, options["l2_reg"])
        return factors

    def finish(factors):
        factors = list(factors)
        if separable:
            for mode, inverse_root in enumerate(inverse_roots or [], start=1):
                if inverse_root is not None:
                    factors[mode] = tl.dot(inverse_root, factors[mode])
        return _to_cp_tensor(factors, options["normalize_factors"])

    factors = list(factors)
    if not separable:
        factors[0] = update_first_factor(unfolded, work_metric, factors, options["l2_reg"])
    best, best_error = list(factors), error_of(factors)
    rec_errors = []
    for iteration in range(options["n_iter_max"]):
        previous_error = best_error
        factors = sweep(factors, cg_rtol)
        error = error_of(factors)
        if error < best_error:
            best, best_error = list(factors), error
        rec_errors.append(best_error)
        cg_rtol = min(1e-3, max(1e-10, 0.1 * (previous_error - best_error) / max(previous_error, 1e-300)))

        if options["verbose"]:
            print(
                f"iteration {iteration + 1}: relative metric error {best_error:.6e}, "
                f"decrease {previous_error - best_error:.3e}"
            )
        if options["callback"] is not None:
            if options["callback"](options["cast"](finish(best)), best_error) is True:
                break
        if common.has_converged([previous_error, best_error], options["tol"]):
            break
    return finish(best), rec_errors


def _to_cp_tensor(factors, normalize_factors):
    """Split the scale of the columns into a weights vector (or spread it over the factors)."""
    factors = list(factors)
    weights = tl.ones((tl.shape(factors[0])[1],), **tl.context(factors[0]))
    for mode, factor in enumerate(factors):
        factors[mode], norms = normalise_columns(factor)
        weights = weights * norms
    if not normalize_factors:
        # Equal column norms across factors keep every factorised layer in the same range,
        # which matters for low-precision inference.
        share = weights ** (1.0 / len(factors))
        factors = [factor * share for factor in factors]
        weights = tl.ones(tl.shape(weights), **tl.context(weights))
    return weights, factors


def weighted_parafac(
    tensor,
    rank,
    metric=None,
    *,
    n_iter_max=100,
    init="svd",
    tol=1e-8,
    random_state=None,
    verbose=0,
    return_errors=False,
    callback=None,
    normalize_factors=False,
    l2_reg=1e-8,
    metric_reg=1e-6,
    solver="auto",
    cg_max_iter=100,
):
    """CP decomposition fitted in the norm of a metric.

    Factorises ``tensor`` as a sum of ``rank`` rank-one terms by minimising

    .. math::

        \\| (X - [\\![ w; U_0, \\dots, U_{N-1} ]\\!])_{(0)} M^{1/2} \\|_F^2,

    where ``M`` acts on the columns of the mode-0 unfolding, as in Kalle et al. [1]_. For a
    convolution weight (out, in, kh, kw) and ``M`` the second moment of the layer's input
    patches, this is the expected squared change of the layer's output. The first factor has
    a closed form (an R x R solve); every other factor solves the metric's coupled normal
    equations, densely when small, block by block for a diagonal metric and by preconditioned
    conjugate gradients otherwise. Identity and Kronecker metrics reduce exactly to ordinary
    ALS on the whitened tensor. A ridge relative to each system's scale bounds the factors when
    rank-one terms start to cancel (CP degeneracy), and the best model met is returned.

    Parameters
    ----------
    tensor : ndarray or torch.Tensor
        Real tensor of order >= 2 on any TensorLy backend and device. For a convolution weight
        use (out, in, kh, kw) for the 4-way layout or (out, in, kh * kw) for the 3-way one.
    rank : int
        Number of rank-one terms; it may exceed the size of any mode. A rank above the
        largest CP rank of the tensor's shape (the product of its mode sizes but the largest)
        is clipped to it with a warning, unless ``init`` gives the factors.
    metric : None, ndarray, list of ndarray, optional
        None (identity), a dense PSD matrix of side ``prod(shape[1:])``, a vector of that
        length (diagonal metric), or a list of per-mode PSD matrices for modes 1..; see
        :func:`tensorly_datc.metric.as_metric`.
    n_iter_max : int, default is 100
        Maximum number of sweeps.
    init : {'svd', 'random', 'whitened'} or CPTensor, default is 'svd'
        Start: TensorLy's SVD-based or random CP start, the SVD start of the tensor whitened by
        a Kronecker approximation of the metric, or given (weights, factors).
    tol : float, default is 1e-8
        Stop when a sweep decreases the relative metric error by less than ``tol`` times its
        value.
    random_state : None, int or numpy.random.RandomState
        Seed for the random start (and for the random columns of the SVD start when ``rank``
        exceeds a mode size).
    verbose : int, default is 0
        If positive, print the error after each sweep.
    return_errors : bool, default is False
        Also return the error after each sweep.
    callback : callable, optional
        Called after each sweep as ``callback(cp_tensor, rec_error)``; returning True stops.
    normalize_factors : bool, default is False
        If True, factors have unit-norm columns and ``weights`` carries the scale. If False,
        ``weights`` is all ones and the scale is spread equally over the factors.
    l2_reg : float, default is 1e-8
        Weight of a proximal term ``||U - U_previous||^2`` added to each factor's normal
        equations, relative to their mean diagonal. It bounds every step when rank-one terms
        start to cancel, and leaves the fixed points (converged models) unbiased.
    metric_reg : float, default is 1e-6
        Ridge added to the metric, relative to its mean eigenvalue.
    solver : {'auto', 'dense', 'cg'}, default is 'auto'
        How the systems of modes >= 1 are solved; 'auto' forms them densely up to 2048
        unknowns.
    cg_max_iter : int, default is 100
        Maximum conjugate-gradient iterations per factor update.

    Returns
    -------
    cp_tensor : tensorly.cp_tensor.CPTensor
        ``(weights, factors)`` with ``factors[k]`` of shape ``(shape[k], rank)``, in the dtype
        and device of ``tensor`` (float64 for an integer tensor); the arithmetic is float64.
    rec_errors : list of float
        Only with ``return_errors=True``: relative metric error of the best model after each
        sweep; never increasing.

    Raises
    ------
    ValueError
        On a tensor with NaN or infinite entries, a rank below 1, an invalid metric, or an
        unknown option string.

    References
    ----------
    .. [1] A. Kalle, T. Rudkiewicz, M.-O. Ouerfelli, M. Tamaazousti, "Distribution-Aware
       Tensor Decomposition for Compression of Convolutional Neural Networks", NeurIPS 2025,
       arXiv:2511.04494.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorly_datc import weighted_parafac
    >>> rng = np.random.default_rng(0)
    >>> weight = rng.standard_normal((8, 6, 3, 3))
    >>> samples = rng.standard_normal((200, 6 * 3 * 3))
    >>> cp_tensor = weighted_parafac(weight, 5, samples.T @ samples / 200)
    >>> [factor.shape for factor in cp_tensor.factors]
    [(8, 5), (6, 5), (3, 5), (3, 5)]
    """
    with backend.use_backend_of(tensor):
        return _decompose(tensor, rank, metric, n_iter_max, init, tol, random_state, verbose,
                          return_errors, callback, normalize_factors, l2_reg, metric_reg, solver,
                          cg_max_iter)


def _decompose(tensor, rank, metric, n_iter_max, init, tol, random_state, verbose,
               return_errors, callback, normalize_factors, l2_reg, metric_reg, solver,
               cg_max_iter):
    """Body of the public function, run under the TensorLy backend of ``tensor``."""
    common.check_tensor(tensor)
    shape = tuple(tl.shape(tensor))
    rank = common.check_int(rank, "rank")
    if isinstance(init, str):
        rank = _clip_rank(rank, shape)
    n_iter_max = common.check_int(n_iter_max, "n_iter_max", minimum=0)
    cg_max_iter = common.check_int(cg_max_iter, "cg_max_iter")
    common.check_tol(tol)
    common.check_random_state(random_state)
    check_solver(solver)
    common.check_callback(callback)
    common.check_nonnegative(l2_reg, "l2_reg")
    _check_init(init, shape, rank)
    context = common.output_context(tensor)

    def cast(decomposition):
        weights, factors = decomposition
        return CPTensor(
            (common.cast_result(weights, context), [common.cast_result(f, context) for f in factors])
        )

    options = dict(n_iter_max=n_iter_max, tol=tol, verbose=verbose, callback=callback,
                   normalize_factors=normalize_factors, l2_reg=l2_reg, solver=solver,
                   cg_max_iter=cg_max_iter, cast=cast)
    metric = as_metric(metric, tensor, metric_reg=metric_reg)
    work = backend.to_compute(tensor, tensor)
    factors = _initial_factors(init, work, metric, rank, random_state)
    decomposition, rec_errors = _run(work, metric, factors, options)
    cp_tensor = cast(decomposition)
    if return_errors:
        return cp_tensor, rec_errors
    return cp_tensor


class WeightedCP(DecompositionMixin):
    """CP decomposition fitted in the norm of a metric.

    Class counterpart of :func:`weighted_parafac`; every argument is passed through to it.

    Attributes
    ----------
    decomposition_ : CPTensor
        Result of the last :meth:`fit_transform`.
    errors_ : list of float
        Relative metric error after each sweep.
    """

    def __init__(self, rank, metric=None, *, n_iter_max=100, init="svd", tol=1e-8,
                 random_state=None, verbose=0, return_errors=False, callback=None,
                 normalize_factors=False, l2_reg=1e-8, metric_reg=1e-6, solver="auto",
                 cg_max_iter=100):
        self.rank = rank
        self.metric = metric
        self.n_iter_max = n_iter_max
        self.init = init
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose
        self.return_errors = return_errors
        self.callback = callback
        self.normalize_factors = normalize_factors
        self.l2_reg = l2_reg
        self.metric_reg = metric_reg
        self.solver = solver
        self.cg_max_iter = cg_max_iter

    def fit_transform(self, tensor):
        """Decompose ``tensor`` and return the CPTensor; the errors go to ``errors_``."""
        cp_tensor, errors = weighted_parafac(
            tensor,
            rank=self.rank,
            metric=self.metric,
            n_iter_max=self.n_iter_max,
            init=self.init,
            tol=self.tol,
            random_state=self.random_state,
            verbose=self.verbose,
            return_errors=True,
            callback=self.callback,
            normalize_factors=self.normalize_factors,
            l2_reg=self.l2_reg,
            metric_reg=self.metric_reg,
            solver=self.solver,
            cg_max_iter=self.cg_max_iter,
        )
        self.decomposition_, self.errors_ = cp_tensor, errors
        return cp_tensor
