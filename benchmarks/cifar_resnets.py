"""Accuracy of compressed pretrained CIFAR-10 ResNets: metric against Frobenius, and beyond.

For each model and parameter ratio, every 3x3 convolution but the stem is compressed and the
top-1 accuracy is measured on the CIFAR-10 test images. Rows (``--rows`` selects them):

* ``frobenius-tucker2``, ``sigma-tucker2``: Tucker-2 in the Frobenius norm and in the input
  statistics' metric, one-shot, the same ratio for every layer;
* ``frobenius-cp``, ``sigma-cp``: the same with CP (``--cp-layout``, default cp3);
* ``transfer-tucker2``: metric Tucker-2 with statistics from 32x32 crops of the photos bundled
  with scikit-learn instead of CIFAR-10 images;
* ``sequential-budget``: sequential calibration with global rank allocation (Tucker-2);
* ``sequential-budget-bn``: the same, then BatchNorm statistics re-estimated.

Example::

    python benchmarks/cifar_resnets.py --data ../shared/data --depths 20 56 --ratios 0.5 0.3333

Calibration uses the first ``--n-calibration`` images of ``cifar10_calibration.npz`` (training
split); accuracy uses the first ``--n-test`` images of ``cifar10_test.npz``. The results are
printed as a Markdown table and written as JSON to ``--output``.
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from tensorly_datc.data import evaluate_accuracy, image_crops, load_cifar10
from tensorly_datc.models import load_cifar_resnet
from tensorly_datc.nn import collect_input_statistics, compress, recalibrate_batchnorm

ROWS = ("frobenius-tucker2", "sigma-tucker2", "frobenius-cp", "sigma-cp", "transfer-tucker2",
        "sequential-budget", "sequential-budget-bn")
WEIGHTS = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th",
           56: "resnet56-4bfd9763.th"}


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data"),
                        help="folder with cifar10_resnets/, cifar10_calibration.npz, cifar10_test.npz")
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56], choices=sorted(WEIGHTS),
                        help="ResNet depths to compress")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1 / 3],
                        help="fraction of the weights each compressed layer keeps (budget for the "
                             "global allocation)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS,
                        help="methods to measure (see the module documentation)")
    parser.add_argument("--cp-layout", default="cp3", choices=("cp3", "cp4"),
                        help="CP layout of the cp rows: 1x1, depthwise 3x3, 1x1 (cp3) or with "
                             "separate 3x1 and 1x3 depthwise convolutions (cp4)")
    parser.add_argument("--n-calibration", type=int, default=1000,
                        help="calibration images, from the start of cifar10_calibration.npz")
    parser.add_argument("--n-test", type=int, default=10000,
                        help="test images, from the start of cifar10_test.npz")
    parser.add_argument("--n-iter-max", type=int, default=50, help="sweeps per decomposition")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random starts and crops")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/cifar_resnets.json"),
                        help="JSON file for the results")
    args = parser.parse_args(argv)
    for ratio in args.ratios:
        if not 0 < ratio <= 1:
            parser.error(f"every value of --ratios must be in (0, 1]; got {ratio}")
    for option in ("n_calibration", "n_test", "n_iter_max"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1; got {getattr(args, option)}")
    return args


# Sequentially compressed models by (model, ratio), shared by the rows with and without BN.
_SEQUENTIAL_CACHE = {}


def run_row(row, model, ratio, calibration, statistics, crop_statistics, arguments):
    """Compress ``model`` as ``row`` says; return the compressed model and its report."""
    options = {"n_iter_max": arguments.n_iter_max, "random_state": arguments.seed}
    common = dict(exclude=["conv1"], progress=False, decomposition_options=options)
    if row in ("frobenius-tucker2", "sigma-tucker2"):
        norm = row.split("-")[0]
        return compress(model, statistics, norm=norm, param_ratio=ratio, **common)
    if row in ("frobenius-cp", "sigma-cp"):
        norm = row.split("-")[0]
        return compress(model, statistics, method=arguments.cp_layout, norm=norm,
                        param_ratio=ratio, **common)
    if row == "transfer-tucker2":
        return compress(model, crop_statistics, param_ratio=ratio, **common)
    key = (id(model), ratio)
    if key not in _SEQUENTIAL_CACHE:
        _SEQUENTIAL_CACHE[key] = compress(model, calibration, calibration="sequential",
                                          budget=ratio, **common)
    compressed, report = _SEQUENTIAL_CACHE[key]
    if row == "sequential-budget-bn":
        # Re-estimating BatchNorm reuses the sequential model instead of compressing again.
        compressed = recalibrate_batchnorm(copy.deepcopy(compressed), calibration, progress=False)
    return compressed, report


def main(argv=None):
    arguments = parse_arguments(argv)
    torch.manual_seed(arguments.seed)
    calibration, _ = load_cifar10(arguments.data / "cifar10_calibration.npz", n=arguments.n_calibration)
    test_images, test_labels = load_cifar10(arguments.data / "cifar10_test.npz", n=arguments.n_test)
    crops = image_crops(arguments.n_calibration, size=32, random_state=arguments.seed)
    results = []
    print(f"calibration images: {len(calibration)}, test images: {len(test_images)}, "
          f"seed {arguments.seed}, sweeps {arguments.n_iter_max}, threads {torch.get_num_threads()}")

    for depth in arguments.depths:
        model = load_cifar_resnet(arguments.data / "cifar10_resnets" / WEIGHTS[depth])
        start = time.perf_counter()
        baseline = evaluate_accuracy(model, test_images, test_labels)
        print(f"ResNet-{depth} uncompressed: top-1 {baseline:.2%}")
        results.append(dict(depth=depth, row="uncompressed", ratio=1.0, top1=baseline))
        statistics = collect_input_statistics(model, calibration, progress=False)
        crop_statistics = None
        if "transfer-tucker2" in arguments.rows:
            crop_statistics = collect_input_statistics(model, crops, progress=False)
        print(f"  statistics: {time.perf_counter() - start:.0f} s")

        for ratio in arguments.ratios:
            for row in arguments.rows:
                start = time.perf_counter()
                compressed, report = run_row(row, model, ratio, calibration, statistics,
                                             crop_statistics, arguments)
                top1 = evaluate_accuracy(compressed, test_images, test_labels)
                totals = report.totals()
                kept = totals["params_after"] / totals["params_before"]
                seconds = time.perf_counter() - start
                print(f"  ratio {ratio:.3f} {row:22s} top-1 {top1:.2%}  params kept {kept:.1%}  "
                      f"{seconds:.0f} s")
                results.append(dict(depth=depth, row=row, ratio=ratio, top1=top1, params_kept=kept,
                                    seconds=seconds, totals=totals))
                arguments.output.parent.mkdir(parents=True, exist_ok=True)
                arguments.output.write_text(json.dumps(dict(arguments=vars(arguments) | {
                    "data": str(arguments.data), "output": str(arguments.output)},
                    results=results), indent=1))

    print_table(results)


def print_table(results):
    """Print the results as a Markdown table, one row per model and method."""
    print("\n| model | method | ratio | params kept | top-1 |")
    print("|---|---|---|---|---|")
    for result in results:
        kept = result.get("params_kept")
        kept = "-" if kept is None else f"{kept:.1%}"
        print(f"| ResNet-{result['depth']} | {result['row']} | {result['ratio']:.3f} | {kept} | "
              f"{result['top1']:.2%} |")


if __name__ == "__main__":
    main()
