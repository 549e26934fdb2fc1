"""Sequential calibration, global rank allocation and BatchNorm re-estimation."""

import copy

import numpy as np
import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from torch import nn

from tensorly_datc import weighted_tucker2
from tensorly_datc.nn import (
    allocate_ranks,
    collect_input_statistics,
    compress,
    count_parameters,
    factorised_parameters,
    rank_ladder,
    recalibrate_batchnorm,
)


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
    ).double()


def _tucker2_to_tensor(core, factors):
    with tl.backend_context("pytorch"):
        return tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])


def _patches(inputs, conv):
    columns = F.unfold(inputs, conv.kernel_size, padding=conv.padding, stride=conv.stride)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def _target(weight, cross, sigma_tilde):
    """Return W C (Sigma~ + ridge)^-1, the ridge being 1e-6 times the mean eigenvalue."""
    size = sigma_tilde.shape[0]
    ridge = 1e-6 * torch.trace(sigma_tilde) / size * torch.eye(size, dtype=torch.float64)
    matrix = weight.reshape(weight.shape[0], -1)
    return torch.linalg.solve(sigma_tilde + ridge, (matrix @ cross).T).T.reshape(weight.shape)


def _effective_tucker2_weight(stack):
    """Recompose the weight of a (1x1, kxk, 1x1) Tucker-2 stack."""
    project, spatial, expand = stack
    weight = torch.einsum("tr,rqij,qs->tsij", expand.weight[:, :, 0, 0], spatial.weight,
                          project.weight[:, :, 0, 0])
    return weight


def test_sequential_equals_brute_force_refit():
    model = _tiny_model()
    inputs = torch.randn(6, 3, 7, 7, dtype=torch.float64)
    ranks = {"0": (3, 2), "2": (3, 4)}
    options = {"n_iter_max": 200, "tol": 1e-12}

    compressed, _ = compress(model, inputs, ranks=ranks, calibration="sequential",
                             progress=False, decomposition_options=options)

    # The first layer sees the same input in both models (C = Sigma~ = Sigma), so its target is
    # W up to the ridge, and it is fitted in Sigma.
    first = model[0]
    x = _patches(inputs, first)
    sigma = x.T @ x / x.shape[0]
    target = _target(first.weight.detach(), sigma, sigma)
    (core, factors), _ = weighted_tucker2(target, ranks["0"], sigma, **options)
    expected_first = _tucker2_to_tensor(core, factors)
    torch.testing.assert_close(_effective_tucker2_weight(compressed[0]), expected_first,
                               rtol=1e-6, atol=1e-8)

    # The second layer: patches of its input in the original and in the compressed model.
    second = model[2]
    with torch.no_grad():
        original_input = torch.relu(first(inputs))
        compressed_input = torch.relu(compressed[0](inputs))
    x, x_tilde = _patches(original_input, second), _patches(compressed_input, second)
    cross = x.T @ x_tilde / x.shape[0]
    sigma_tilde = x_tilde.T @ x_tilde / x.shape[0]
    target = _target(second.weight.detach(), cross, sigma_tilde)
    (core, factors), _ = weighted_tucker2(target, ranks["2"], sigma_tilde, **options)
    expected_second = _tucker2_to_tensor(core, factors)
    torch.testing.assert_close(_effective_tucker2_weight(compressed[2]), expected_second,
                               rtol=1e-6, atol=1e-8)


def test_sequential_output_error_not_above_one_shot():
    model = _tiny_model()
    inputs = torch.randn(8, 3, 7, 7, dtype=torch.float64)
    ranks = {"0": (3, 2), "2": (2, 3)}
    options = {"n_iter_max": 100}

    sequential, _ = compress(model, inputs, ranks=ranks, calibration="sequential",
                             progress=False, decomposition_options=options)
    one_shot, _ = compress(model, inputs, ranks=ranks, progress=False,
                           decomposition_options=options)

    with torch.no_grad():
        reference = model(inputs)
        sequential_error = torch.sum((sequential(inputs) - reference) ** 2)
        one_shot_error = torch.sum((one_shot(inputs) - reference) ** 2)
    # The last layer minimises exactly this error on the calibration inputs.
    assert sequential_error <= one_shot_error * (1 + 1e-9)


def test_sequential_rejects_statistics_and_iterators():
    model = _tiny_model()
    inputs = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    statistics = collect_input_statistics(model, inputs, progress=False)
    with pytest.raises(ValueError, match="statistics"):
        compress(model, statistics, calibration="sequential", progress=False)
    with pytest.raises(ValueError, match="iterator"):
        compress(model, iter([inputs]), calibration="sequential", progress=False)


def _budget_model():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
        nn.Conv2d(24, 16, 3, padding=1),
    )


@pytest.mark.parametrize("method", ["tucker2", "cp3"])
@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_allocation_meets_budget_within_one_step(method, budget):
    model = _budget_model()
    inputs = torch.randn(8, 3, 8, 8)
    statistics = collect_input_statistics(model, inputs, progress=False)
    layers = [(name, module, method) for name, module in model.named_modules()
              if isinstance(module, nn.Conv2d)]

    ranks = allocate_ranks(layers, budget, statistics=statistics, options={"n_iter_max": 5})

    total = sum(module.weight.numel() for _, module, _ in layers)
    costs = {name: factorised_parameters(method, tuple(module.weight.shape), ranks[name])
             for name, module, _ in layers}
    assert sum(costs.values()) <= budget * total
    for name, module, _ in layers:
        ladder = rank_ladder(module, method)
        ranks_on_ladder = [rank for rank, _ in ladder]
        assert ranks[name] in ranks_on_ladder
        level = ranks_on_ladder.index(ranks[name])
        if level + 1 < len(ladder):
            # One more step of any layer would break the budget.
            step = ladder[level + 1][1] - ladder[level][1]
            assert sum(costs.values()) + step > budget * total
        smallest = min(ranks[name]) if isinstance(ranks[name], tuple) else ranks[name]
        assert smallest >= 1


def test_budget_in_compress_reports_chosen_ranks():
    model = _budget_model()
    inputs = torch.randn(8, 3, 8, 8)

    compressed, report = compress(model, inputs, budget=0.4, progress=False,
                                  decomposition_options={"n_iter_max": 5})

    totals = report.totals()
    weights = sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Conv2d))
    biases = sum(module.bias.numel() for module in model.modules() if isinstance(module, nn.Conv2d))
    assert totals["params_after"] - biases <= 0.4 * weights
    assert all(row.rank is not None for row in report.compressed)
    assert len({row.rank for row in report.compressed}) > 1  # not one ratio for every layer


def test_budget_excludes_param_ratio():
    with pytest.raises(ValueError, match="budget"):
        compress(_budget_model(), torch.randn(2, 3, 8, 8), budget=0.5, param_ratio=0.5,
                 progress=False)


def test_recalibrate_batchnorm_changes_only_running_statistics():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    inputs = torch.randn(16, 3, 6, 6) * 3 + 1

    recalibrate_batchnorm(model, inputs, batch_size=16, progress=False)

    state = model.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.equal(state[key], before[key])
    with torch.no_grad():
        activations = model[0](inputs)
    expected_mean = activations.mean(dim=(0, 2, 3))
    expected_var = activations.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(state["1.running_mean"], expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["1.running_var"], expected_var, rtol=1e-5, atol=1e-6)
    assert model.training  # modes restored
    assert model[1].momentum == 0.1


def test_recalibrate_batchnorm_never_worsens_calibration_error():
    # A layer replaced by a rough factorisation shifts the activations that BatchNorm sees;
    # re-estimated statistics bring the normalised activations back to zero mean.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    inputs = torch.randn(32, 3, 8, 8)
    recalibrate_batchnorm(model, inputs, progress=False)
    model.eval()
    compressed, _ = compress(model, inputs, param_ratio=0.2, progress=False)
    recalibrated = recalibrate_batchnorm(copy.deepcopy(compressed), inputs, progress=False)

    with torch.no_grad():
        before = compressed(inputs).mean(dim=(0, 2, 3)).abs().max()
        after = recalibrated(inputs).mean(dim=(0, 2, 3)).abs().max()
    assert after <= before + 1e-6
    assert float(after) < 1e-3  # float32 batch statistics of 2048 values per channel
    assert count_parameters(recalibrated) == count_parameters(compressed)
    np.testing.assert_array_equal(
        compressed[3][1].weight.detach().numpy(), recalibrated[3][1].weight.detach().numpy()
    )
