"""Metric-weighted Tucker-2 decomposition: the function and its class counterpart."""

import math

import numpy as np
import tensorly as tl
from tensorly.decomposition._base_decomposition import DecompositionMixin

from .. import _backend as backend
from .._solvers import check_solver
from ..metric import as_metric, kronecker_approximation
from . import _common as common
from ._tucker2_steps import (
    FLOAT32_MIN_RTOL,
    reconstruct_unfolded,
    solves_in_float32,
    squared_norm,
    update_input_factor,
    update_output_and_core,
)

__all__ = ["weighted_tucker2", "WeightedTucker2"]

# Relative error under which the error of a sweep is measured on the residual instead of as
# tr(W M W^T) - tr(W~ M W~^T), whose float64 cancellation leaves about 1e-8 of absolute
# accuracy on the relative error.
CLOSED_FORM_MIN_ERROR = 1e-3


def _check_rank(rank, shape):
    """Return the Tucker-2 ranks (R0, R1), clipped to what the model can use.

    Each rank is clipped to the size of its mode, then to the multilinear limit: the mode-0
    unfolding of the core has R1 * K columns (K the product of the other modes), so a larger
    R0 adds nothing, and likewise R1 <= R0 * K.
    """
    if isinstance(rank, (list, tuple)):
        if len(rank) != 2:
            raise ValueError(f"rank must be an int or a pair (rank of mode 0, rank of mode 1); got {rank!r}")
        ranks = [common.check_int(r, f"rank[{mode}]") for mode, r in enumerate(rank)]
    else:
        ranks = [common.check_int(rank, "rank")] * 2
    for mode in (0, 1):
        ranks[mode] = common.clip_rank(ranks[mode], shape[mode], mode, stacklevel=4)
    n_taps = math.prod(shape[2:])
    for mode in (0, 1):
        limit = ranks[1 - mode] * n_taps
        if ranks[mode] > limit:
            common.warn_clip(mode, ranks[mode], limit, f"the rank of mode {1 - mode} times the size "
                             "of the remaining modes", stacklevel=4)
            ranks[mode] = limit
    return tuple(ranks)


def _check_init(init, tensor_shape, ranks):
    if isinstance(init, str):
        if init not in common.INIT_NAMES:
            raise ValueError(
                f"init must be one of {common.INIT_NAMES} or a (core, factors) pair; got {init!r}"
            )
        return
    try:
        core, factors = init
        factors = list(factors)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"init must be one of {common.INIT_NAMES} or a (core, factors) pair; got {type(init).__name__}"
        ) from error
    if len(factors) != 2:
        raise ValueError(f"init must hold 2 factors (modes 0 and 1); got {len(factors)}")
    expected = [(tensor_shape[0], ranks[0]), (tensor_shape[1], ranks[1])]
    for mode, (factor, shape) in enumerate(zip(factors, expected)):
        if tuple(tl.shape(factor)) != shape:
            raise ValueError(
                f"init factor of mode {mode} must have shape {shape}; got {tuple(tl.shape(factor))}"
            )
    common.check_init_finite([core] + factors)
    core_shape = tuple(ranks) + tuple(tensor_shape[2:])
    if tuple(tl.shape(core)) != core_shape:
        raise ValueError(f"init core must have shape {core_shape}; got {tuple(tl.shape(core))}")


def _initial_input_factor(init, tensor, metric, ranks, random_state):
    """Return the starting input factor (I1, R1) with orthonormal columns."""
    shape = tuple(tl.shape(tensor))
    n_inputs = shape[1]
    if not isinstance(init, str):
        factor = backend.to_compute(list(init[1])[1], tensor)
        return common.orthonormalise(factor)[0]
    if init == "random":
        return common.random_orthonormal(n_inputs, ranks[1], random_state, tensor)

    mode1 = tl.reshape(tl.moveaxis(tensor, 1, 0), (n_inputs, -1))
    if init == "svd":
        return common.leading_left_singular_vectors(mode1, ranks[1])

    # Whitened start: approximate the metric by a Kronecker product, take the leading singular
    # vectors of the whitened tensor, and map them back.
    first, rest = kronecker_approximation(metric, (n_inputs, math.prod(shape[2:])))
    if first is None:
        return common.leading_left_singular_vectors(mode1, ranks[1])
    whitened = tl.reshape(tensor, (shape[0], n_inputs, -1))
    first_root, first_inverse_root = _symmetric_roots(first)
    whitened = tl.tenalg.mode_dot(whitened, first_root, 1)
    if rest is not None:
        whitened = tl.tenalg.mode_dot(whitened, _symmetric_roots(rest)[0], 2)
    whitened1 = tl.reshape(tl.moveaxis(whitened, 1, 0), (n_inputs, -1))
    leading = common.leading_left_singular_vectors(whitened1, ranks[1])
    return common.orthonormalise(tl.dot(first_inverse_root, leading))[0]


def _symmetric_roots(matrix):
    eigenvalues, eigenvectors = tl.eigh((matrix + tl.transpose(matrix)) / 2)
    eigenvalues = tl.clip(eigenvalues, tl.max(eigenvalues) * 1e-14, None)
    root = tl.dot(eigenvectors * tl.sqrt(eigenvalues), tl.transpose(eigenvectors))
    inverse_root = tl.dot(eigenvectors / tl.sqrt(eigenvalues), tl.transpose(eigenvectors))
    return root, inverse_root


def _whiten(tensor, metric):
    """Apply the square roots of a Kronecker (or identity) metric to modes 1.. of ``tensor``."""
    if metric.kind == "identity":
        return tensor, None
    roots, inverse_roots = metric.square_roots()
    whitened = tensor
    for mode, root in enumerate(roots, start=1):
        if root is not None:
            whitened = tl.tenalg.mode_dot(whitened, root, mode)
    return whitened, (roots, inverse_roots)


def _run_hooi(tensor, metric, ranks, input_factor, options):
    """Tucker-2 for identity and Kronecker metrics: HOOI on the whitened tensor, mapped back.

    With ``M = kron(M_1, ..., M_{N-1})``, the metric error of a Tucker-2 model equals the
    Frobenius error of the model of ``tensor x_k M_k^{1/2}``, so the weighted problem is solved
    exactly by alternating the two optimal factor updates there (higher-order orthogonal
    iteration), each a leading-subspace computation.
    """
    shape = tuple(tl.shape(tensor))
    whitened, roots = _whiten(tensor, metric)
    if roots is not None and roots[0][0] is not None:
        input_factor = common.orthonormalise(tl.dot(roots[0][0], input_factor))[0]
    norm = float(tl.norm(whitened))

    def step(input_factor):
        projected = tl.tenalg.mode_dot(whitened, tl.transpose(input_factor), 1)
        output_factor = common.leading_left_singular_vectors(tl.unfold(projected, 0), ranks[0])
        projected = tl.tenalg.mode_dot(whitened, tl.transpose(output_factor), 0)
        input_factor = common.leading_left_singular_vectors(tl.unfold(projected, 1), ranks[1])
        core = tl.tenalg.mode_dot(projected, tl.transpose(input_factor), 1)
        approximation = tl.tenalg.multi_mode_dot(core, [output_factor, input_factor], modes=[0, 1])
        error = float(tl.norm(whitened - approximation)) / norm if norm > 0 else 0.0
        return (output_factor, core, input_factor), error

    def finish(state):
        output_factor, core, input_factor = state
        if roots is None:
            return core, [output_factor, input_factor]
        _, inverse_roots = roots
        if inverse_roots[0] is not None:
            input_factor, triangular = common.orthonormalise(tl.dot(inverse_roots[0], input_factor))
            core = tl.tenalg.mode_dot(core, triangular, 1)
        for mode, inverse_root in enumerate(inverse_roots[1:], start=2):
            if inverse_root is not None:
                core = tl.tenalg.mode_dot(core, inverse_root, mode)
        return core, [output_factor, input_factor]

    return _iterate(step, finish, input_factor, shape, options)


def _run_alternating(tensor, metric, ranks, input_factor, options):
    """Tucker-2 for dense and diagonal metrics: alternate the joint (output, core) update and
    the input-factor solve."""
    shape = tuple(tl.shape(tensor))
    n_taps = math.prod(shape[2:])
    unfolded = tl.reshape(tensor, (shape[0], -1))
    norm_squared = squared_norm(unfolded, metric, n_taps)
    state = {"cg_rtol": 1e-4}

    def step(input_factor):
        if "core" in state:
            input_factor, _ = update_input_factor(
                unfolded, metric, state["output_factor"], state["core"], input_factor,
                solver=options["solver"], cg_rtol=state["cg_rtol"], cg_max_iter=options["cg_max_iter"],
            )
            input_factor = common.orthonormalise(input_factor)[0]
        output_factor, core, captured = update_output_and_core(
            unfolded, metric, input_factor, ranks[0], n_taps, solver=options["solver"]
        )
        state.update(output_factor=output_factor, core=core)
        state["float32"] = solves_in_float32(unfolded, metric, n_taps)
        if norm_squared == 0:
            return (output_factor, core, input_factor), 0.0
        error_squared = max(norm_squared - captured, 0.0) / norm_squared
        if error_squared < CLOSED_FORM_MIN_ERROR**2:
            # The difference of two nearly equal traces has lost most of its digits: measure the
            # residual itself (a product of cost I0 D^2).
            residual = unfolded - reconstruct_unfolded(output_factor, core, input_factor, n_taps)
            error_squared = max(float(metric.quadratic(residual)), 0.0) / norm_squared
        return (output_factor, core, input_factor), math.sqrt(error_squared)

    def finish(best):
        output_factor, core, input_factor = best
        return tl.reshape(core, ranks + shape[2:]), [output_factor, input_factor]

    return _iterate(step, finish, input_factor, shape, options, state)


def _iterate(step, finish, input_factor, shape, options, state=None):
    """Run sweeps of ``step`` until convergence, keeping the best iterate.

    The first call of ``step`` completes the initial factor into a model; each later one is a
    full sweep from the current model. ``rec_errors[i]`` is the error of the best model after
    sweep ``i``, so the list never increases even when an inexact inner solve makes a sweep worse.
    """
    current, best_error = step(input_factor)
    best = current
    rec_errors = []
    for iteration in range(options["n_iter_max"]):
        previous_error = best_error
        current, error = step(current[2])
        if error < best_error:
            best, best_error = current, error
        rec_errors.append(best_error)

        if state is not None:
            # Solve the next input factor to an accuracy matched to this sweep's progress.
            decrease = (previous_error - best_error) / max(previous_error, 1e-300)
            state["cg_rtol"] = min(1e-3, max(1e-10, 0.1 * decrease))

        if options["verbose"]:
            print(
                f"iteration {iteration + 1}: relative metric error {best_error:.6e}, "
                f"decrease {previous_error - best_error:.3e}"
            )
        if options["callback"] is not None:
            core, factors = options["cast"](finish(best))
            if options["callback"]((core, factors), best_error) is True:
                break
        if common.has_converged([previous_error, best_error], options["tol"]):
            # A sweep of float32 solves resolves relative decreases down to about
            # FLOAT32_MIN_RTOL only. Below that tolerance the run goes on, and the small decrease
            # has just set the next solves to float64, so a float64 sweep decides convergence.
            if state is not None and state.get("float32") and options["tol"] < FLOAT32_MIN_RTOL:
                continue
            break
    return finish(best), rec_errors


def weighted_tucker2(
    tensor,
    rank,
    metric=None,
    *,
    n_iter_max=100,
    init="svd",
    tol=1e-6,
    random_state=None,
    verbose=0,
    callback=None,
    metric_reg=1e-6,
    solver="auto",
    cg_max_iter=100,
):
    """Tucker-2 decomposition fitted in the norm of a metric.

    Factorises ``tensor`` as ``core x_0 U_0 x_1 U_1``, with factors on modes 0 and 1 only
    (for a convolution weight of shape (out, in, kh, kw): the output and input channels) and
    the other modes kept whole in the core, by minimising

    .. math::

        \\| (X - \\operatorname{core} \\times_0 U_0 \\times_1 U_1)_{(0)} M^{1/2} \\|_F^2,

    where ``M`` acts on the columns of the mode-0 unfolding, as in Kalle et al. [1]_. With ``M``
    the second moment of a layer's input patches this is the expected squared change of the
    layer's output. For dense and diagonal metrics the algorithm alternates the exact joint
    minimisation over ``U_0`` and the core (a leading eigenspace) with the exact minimisation
    over ``U_1`` (a positive definite linear system, solved densely when small and by
    preconditioned conjugate gradients otherwise). Identity and Kronecker metrics are solved
    exactly by higher-order orthogonal iteration on the whitened tensor.

    Parameters
    ----------
    tensor : ndarray or torch.Tensor
        Real tensor of order >= 2, on any TensorLy backend and device.
    rank : int or (int, int)
        Ranks of modes 0 and 1. A rank larger than its mode is clipped with a warning.
    metric : None, ndarray, list of ndarray, optional
        None (identity, the ordinary Tucker-2), a dense symmetric PSD matrix of side
        ``prod(shape[1:])``, a vector of that length (diagonal metric), or a list of per-mode
        PSD matrices for modes 1.. whose Kronecker product is the metric. See
        :func:`tensorly_datc.metric.as_metric`.
    n_iter_max : int, default is 100
        Maximum number of sweeps.
    init : {'svd', 'random', 'whitened'} or (core, factors), default is 'svd'
        Start of the input factor: leading singular vectors of the mode-1 unfolding, a random
        orthonormal matrix, or those of the tensor whitened by a Kronecker approximation of the
        metric (a metric-aware start, exact for Kronecker metrics). A (core, factors) pair, as
        returned by this function, starts from its mode-1 factor.
    tol : float, default is 1e-6
        Stop when a sweep decreases the relative metric error by less than ``tol`` times its
        value.
    random_state : None, int or numpy.random.RandomState
        Seed for ``init='random'``.
    verbose : int, default is 0
        If positive, print the error after each sweep.
    callback : callable, optional
        Called after each sweep as ``callback((core, factors), rec_error)``; returning True stops
        the iteration.
    metric_reg : float, default is 1e-6
        Ridge added to the metric, relative to its mean eigenvalue, so that singular metrics
        give well-posed systems.
    solver : {'auto', 'dense', 'cg'}, default is 'auto'
        How the input-factor system is solved: formed densely (cost ``(I1 R1)^3``), or by
        matrix-free conjugate gradients (cost ``R0 D^2`` per iteration). 'auto' uses the dense
        solve up to 2048 unknowns.
    cg_max_iter : int, default is 100
        Maximum conjugate-gradient iterations per sweep.

    Returns
    -------
    (core, factors) : (tensor, list of 2 tensors)
        ``core`` of shape ``(R0, R1) + shape[2:]``; ``factors[0]`` of shape (I0, R0) and
        ``factors[1]`` of shape (I1, R1), both with orthonormal columns. Same form as
        ``tensorly.decomposition.partial_tucker(tensor, rank, modes=[0, 1])``. They have the
        dtype and device of ``tensor`` (float64 for an integer tensor); the arithmetic is done
        in float64.
    rec_errors : list of float
        Relative metric error ``||(X - X~)_(0) L|| / ||X_(0) L||`` (``L L^T`` the regularised
        metric) of the best model after each sweep; never increasing.

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
    >>> from tensorly_datc import weighted_tucker2
    >>> rng = np.random.default_rng(0)
    >>> weight = rng.standard_normal((8, 6, 3, 3))
    >>> samples = rng.standard_normal((200, 6 * 3 * 3))
    >>> metric = samples.T @ samples / 200
    >>> (core, factors), rec_errors = weighted_tucker2(weight, (4, 3), metric)
    >>> core.shape, factors[0].shape, factors[1].shape
    ((4, 3, 3, 3), (8, 4), (6, 3))
    """
    with backend.use_backend_of(tensor):
        return _decompose(tensor, rank, metric, n_iter_max, init, tol, random_state, verbose,
                          callback, metric_reg, solver, cg_max_iter)


def _decompose(tensor, rank, metric, n_iter_max, init, tol, random_state, verbose, callback,
               metric_reg, solver, cg_max_iter):
    """Body of the public function, run under the TensorLy backend of ``tensor``."""
    common.check_tensor(tensor)
    shape = tuple(tl.shape(tensor))
    ranks = _check_rank(rank, shape)
    n_iter_max = common.check_int(n_iter_max, "n_iter_max", minimum=0)
    cg_max_iter = common.check_int(cg_max_iter, "cg_max_iter")
    common.check_tol(tol)
    common.check_random_state(random_state)
    check_solver(solver)
    common.check_callback(callback)
    _check_init(init, shape, ranks)
    context = common.output_context(tensor)

    def cast(decomposition):
        core, factors = decomposition
        return common.cast_result(core, context), [common.cast_result(f, context) for f in factors]

    options = dict(n_iter_max=n_iter_max, tol=tol, verbose=verbose, callback=callback,
                   solver=solver, cg_max_iter=cg_max_iter, cast=cast)
    metric = as_metric(metric, tensor, metric_reg=metric_reg)
    work = backend.to_compute(tensor, tensor)
    input_factor = _initial_input_factor(init, work, metric, ranks, random_state)
    if metric.kind in ("identity", "kronecker"):
        decomposition, rec_errors = _run_hooi(work, metric, ranks, input_factor, options)
    else:
        decomposition, rec_errors = _run_alternating(work, metric, ranks, input_factor, options)
    return cast(decomposition), rec_errors


class WeightedTucker2(DecompositionMixin):
    """Tucker-2 decomposition fitted in the norm of a metric.

    Class counterpart of :func:`weighted_tucker2`; every argument is passed through to it.

    Attributes
    ----------
    decomposition_ : (core, factors)
        Result of the last :meth:`fit_transform`.
    errors_ : list of float
        Relative metric error after each sweep.
    """

    def __init__(self, rank, metric=None, *, n_iter_max=100, init="svd", tol=1e-6,
                 random_state=None, verbose=0, callback=None, metric_reg=1e-6, solver="auto",
                 cg_max_iter=100):
        self.rank = rank
        self.metric = metric
        self.n_iter_max = n_iter_max
        self.init = init
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose
        self.callback = callback
        self.metric_reg = metric_reg
        self.solver = solver
        self.cg_max_iter = cg_max_iter

    def fit_transform(self, tensor):
        """Decompose ``tensor`` and return ``(core, factors)``."""
        self.decomposition_, self.errors_ = weighted_tucker2(
            tensor,
            rank=self.rank,
            metric=self.metric,
            n_iter_max=self.n_iter_max,
            init=self.init,
            tol=self.tol,
            random_state=self.random_state,
            verbose=self.verbose,
            callback=self.callback,
            metric_reg=self.metric_reg,
            solver=self.solver,
            cg_max_iter=self.cg_max_iter,
        )
        return self.decomposition_
