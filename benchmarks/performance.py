"""Speed of the weighted decompositions and of the input statistics, against plain baselines.

Four figures, each measured in one run with the compared calls alternated, so that the load of
a shared machine affects both sides alike:

* ``tucker2``: time of ``weighted_tucker2`` over TensorLy's ``partial_tucker`` on the
  512x512x3x3 weight of torchvision's ResNet-18 ``layer4.1.conv2``, ranks (256, 256), 10
  sweeps. The model has its seeded initialisation (``torch.manual_seed(0)``, no download), and
  the metric is the dense 4608x4608 second moment of the layer's input patches;
* ``cp``: time of ``weighted_parafac`` over TensorLy's ``parafac`` (``init='svd'``) on the
  256x256x3x3 weight of ``layer3.1.conv2`` with its 2304x2304 metric, rank 256, 10 sweeps;
* ``statistics``: time of ``collect_input_statistics`` over every convolution of the model
  over the time of the plain forward pass, on batches of 32 images, and the peak memory;
* ``quality``: metric error of the Tucker-2 fit after 10 sweeps, after 50 sweeps, and of
  TensorLy's Frobenius Tucker-2, all measured in the same (unregularised) metric.

The images are CIFAR-10 calibration images, normalised and upsampled to 224x224 (bilinear).
The weights are float32 torch tensors, as in the model.

Example::

    python benchmarks/performance.py --data ../shared/data
    python benchmarks/performance.py --data ../shared/data --targets statistics --threads 1
"""

import argparse
import os
import sys
import threading
import time
from pathlib import Path

# Measure the working tree this script belongs to, not an installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorly as tl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from tensorly.decomposition import parafac, partial_tucker  # noqa: E402

from tensorly_datc import weighted_parafac, weighted_tucker2  # noqa: E402
from tensorly_datc.data import load_cifar10  # noqa: E402
from tensorly_datc.nn import collect_input_statistics  # noqa: E402

TARGETS = ("tucker2", "cp", "statistics", "quality")
TUCKER_LAYER, TUCKER_RANKS = "layer4.1.conv2", (256, 256)
CP_LAYER, CP_RANK = "layer3.1.conv2", 256
N_SWEEPS, N_SWEEPS_LONG = 10, 50
IMAGE_SIZE = 224


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data"),
                        help="folder with cifar10_calibration.npz")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS,
                        help="figures to measure (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternated pairs of timed calls per figure")
    parser.add_argument("--n-calibration", type=int, default=256,
                        help="images whose input statistics form the metrics of the decompositions")
    parser.add_argument("--n-batches", type=int, default=4,
                        help="batches of 32 images for the statistics figure")
    return parser.parse_args(argv)


class PeakMemory:
    """Context manager that samples the resident set size of this process every 5 ms.

    ``peak`` is the largest sample in bytes, ``start`` the size on entry. Both stay None where
    /proc/self/statm cannot be read, that is outside Linux.
    """

    def __init__(self):
        self.start = self.peak = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _resident():
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None

    def _sample(self):
        while not self._stop.wait(0.005):
            size = self._resident()
            if size is not None and (self.peak is None or size > self.peak):
                self.peak = size

    def __enter__(self):
        self.start = self.peak = self._resident()
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()


def timed(function):
    """Return (seconds, result) of one call of ``function``."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def alternate(first, second, repeats):
    """Time ``first`` and ``second`` alternately after one untimed call of each; return their
    times and last results."""
    first()
    second()
    times_first, times_second = [], []
    for _ in range(repeats):
        seconds, result_first = timed(first)
        times_first.append(seconds)
        seconds, result_second = timed(second)
        times_second.append(seconds)
    return times_first, times_second, result_first, result_second


def report_ratio(name, times_baseline, times_ours, baseline_name, limit):
    """Print the ratio of each alternated pair and their median against ``limit``."""
    ratios = [ours / baseline for ours, baseline in zip(times_ours, times_baseline)]
    median = float(np.median(ratios))
    print(f"{name}: {baseline_name} {' '.join(f'{t:.2f}' for t in times_baseline)} s, "
          f"ours {' '.join(f'{t:.2f}' for t in times_ours)} s, ratios "
          f"{' '.join(f'{r:.2f}' for r in ratios)}, median {median:.2f} "
          f"(limit {limit}: {'met' if median <= limit else 'NOT met'})", flush=True)


def load_images(data, n_images):
    images, _ = load_cifar10(data / "cifar10_calibration.npz", n=n_images)
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)


def seeded_resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def layer_problems(model, images):
    """Return {layer: (weight, second moment)} for the two decomposed layers."""
    statistics = collect_input_statistics(model, images, layers=[TUCKER_LAYER, CP_LAYER],
                                          batch_size=32, progress=False)
    modules = dict(model.named_modules())
    return {
        name: (modules[name].weight.detach().clone(), statistics[name].second_moment)
        for name in (TUCKER_LAYER, CP_LAYER)
    }


def metric_error(weight, approximation, metric):
    """Return ``||(W - W~) L|| / ||W L||`` with ``L L^T = metric``, in float64."""
    unfolded = weight.to(torch.float64).reshape(weight.shape[0], -1)
    residual = unfolded - approximation.to(torch.float64).reshape(weight.shape[0], -1)
    squared = (residual * (residual @ metric)).sum() / (unfolded * (unfolded @ metric)).sum()
    return float(torch.sqrt(squared))


def tucker_approximation(core, factors):
    return tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])


def run_tucker2(problem, repeats):
    weight, metric = problem
    times_baseline, times_ours, baseline, ours = alternate(
        lambda: partial_tucker(weight, TUCKER_RANKS, modes=[0, 1], n_iter_max=N_SWEEPS, tol=0),
        lambda: weighted_tucker2(weight, TUCKER_RANKS, metric, n_iter_max=N_SWEEPS, tol=0),
        repeats,
    )
    report_ratio("tucker2", times_baseline, times_ours, "partial_tucker", 1.5)
    return baseline, ours


def run_cp(problem, repeats):
    weight, metric = problem
    times_baseline, times_ours, _, _ = alternate(
        lambda: parafac(weight, CP_RANK, n_iter_max=N_SWEEPS, tol=0, init="svd"),
        lambda: weighted_parafac(weight, CP_RANK, metric, n_iter_max=N_SWEEPS, tol=0),
        repeats,
    )
    report_ratio("cp", times_baseline, times_ours, "parafac", 2.0)


def run_statistics(model, images, repeats):
    layers = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]

    def forward():
        with torch.no_grad():
            for batch in images.split(32):
                model(batch)

    def collect():
        return collect_input_statistics(model, images, layers=layers, batch_size=32, progress=False)

    # Untimed calls first, so that neither side pays for the first touch of its memory
    forward()
    collect()
    times_forward, times_collect, peaks_forward, peaks_collect = [], [], [], []
    for _ in range(repeats):
        with PeakMemory() as memory:
            seconds, _ = timed(forward)
        times_forward.append(seconds)
        peaks_forward.append(memory)
        with PeakMemory() as memory:
            seconds, statistics = timed(collect)
        times_collect.append(seconds)
        peaks_collect.append(memory)
        del statistics
    report_ratio(f"statistics ({len(layers)} convolutions, {images.shape[0] // 32} batches of 32)",
                 times_forward, times_collect, "forward", 4.0)
    if peaks_collect[-1].peak is not None:
        stored = sum((module.weight[0].numel() ** 2 + module.weight[0].numel()) * 8
                     for name, module in model.named_modules() if name in layers)
        print(f"statistics memory: resident set at start {peaks_collect[-1].start / 2**30:.2f} GiB, "
              f"peak during forward {max(m.peak for m in peaks_forward) / 2**30:.2f} GiB, "
              f"peak during collection {max(m.peak for m in peaks_collect) / 2**30:.2f} GiB "
              f"(the float64 moments themselves take {stored / 2**30:.2f} GiB)", flush=True)
    else:
        print("statistics memory: not measured (needs /proc/self/statm)", flush=True)


def run_quality(problem, tucker_results):
    weight, metric = problem
    metric64 = metric.to(torch.float64)
    if tucker_results is None:
        baseline = partial_tucker(weight, TUCKER_RANKS, modes=[0, 1], n_iter_max=N_SWEEPS, tol=0)
        ours = weighted_tucker2(weight, TUCKER_RANKS, metric, n_iter_max=N_SWEEPS, tol=0)
    else:
        baseline, ours = tucker_results
    (core, factors), _ = baseline
    frobenius = metric_error(weight, tucker_approximation(core, factors), metric64)
    (core, factors), _ = ours
    weighted = metric_error(weight, tucker_approximation(core, factors), metric64)
    (core, factors), _ = weighted_tucker2(weight, TUCKER_RANKS, metric, n_iter_max=N_SWEEPS_LONG, tol=0)
    weighted_long = metric_error(weight, tucker_approximation(core, factors), metric64)
    excess = weighted / weighted_long - 1
    print(f"quality: relative metric error of Frobenius Tucker-2 {frobenius:.5f}, weighted Tucker-2 "
          f"after {N_SWEEPS} sweeps {weighted:.5f}, after {N_SWEEPS_LONG} sweeps {weighted_long:.5f} "
          f"({100 * excess:.2f} % above; limit: below Frobenius and within 1 %: "
          f"{'met' if weighted < frobenius and excess <= 0.01 else 'NOT met'})", flush=True)


def main(argv=None):
    args = parse_arguments(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tl.set_backend("pytorch")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}", flush=True)

    model = seeded_resnet18()
    problems = None
    if {"tucker2", "cp", "quality"} & set(args.targets):
        problems = layer_problems(model, load_images(args.data, args.n_calibration))
    tucker_results = None
    if "tucker2" in args.targets:
        tucker_results = run_tucker2(problems[TUCKER_LAYER], args.repeats)
    if "cp" in args.targets:
        run_cp(problems[CP_LAYER], args.repeats)
    if "statistics" in args.targets:
        run_statistics(model, load_images(args.data, 32 * args.n_batches), args.repeats)
    if "quality" in args.targets:
        run_quality(problems[TUCKER_LAYER], tucker_results)
    print(f"load average at the end {' '.join(f'{load:.2f}' for load in os.getloadavg())}")


if __name__ == "__main__":
    main()
