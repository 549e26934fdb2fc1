"""
Compress a CNN with metric-weighted Tucker-2 and CP
===================================================

A convolution compressed in the Frobenius norm treats all of its weights alike, although a weight
that multiplies a large and frequent input pattern changes the layer's output far more than one
that multiplies a rare pattern. :func:`tensorly_datc.nn.compress` with ``norm='sigma'`` fits each
layer's weight ``W`` in the norm :math:`\\|(W - \\tilde W) \\Sigma^{1/2}\\|_F` instead, where
:math:`\\Sigma` is the uncentred second moment of the layer's input patches. The square of this
norm is the expected squared change of the layer's output over the calibration data.

This example trains the small CNN for scikit-learn's 8x8 digits, compresses its convolutions with
Tucker-2 and CP at several parameter ratios, once in each norm, and plots the test accuracy
against the number of parameters of the compressed layers. No fine-tuning follows the
compression. The first convolution has a single input channel and only 144 weights, so it is
left unchanged.

From the command line the same script also compresses a pretrained CIFAR-10 ResNet, one of
the networks of He et al. (2016) such as those trained by Yerlan Idelbayev in
``github.com/akamaster/pytorch_resnet_cifar10``. The CIFAR-10 images come from two ``.npz``
archives that contain ``images`` (uint8, shape ``(N, 32, 32, 3)``, RGB) and ``labels``::

    python plot_compress_cnn.py --weights resnet56-4bfd9763.th --data cifar10/ \\
        --methods tucker2 cp4 --ratios 0.5 0.33

Run ``python plot_compress_cnn.py --help`` for all options.
"""

# %%
# Options
# -------
# Every setting is a command-line option. The gallery runs the script with the defaults, which
# select the digits CNN, Tucker-2 and CP-4, and the ratios 0.5, 0.33 and 0.25. The arguments
# are parsed before PyTorch is imported, so ``--help`` and argument errors return at once.

import argparse
import sys
import time
from pathlib import Path

METHODS = ("tucker2", "cp4", "cp3")
NORMS = ("sigma", "frobenius")
FIGURE_NAME = "compress_cnn.png"
IN_JUPYTER = "ipykernel" in sys.modules

# Image counts used with --weights unless --n-calibration and --n-test are given. A ResNet-56
# took 12 s per 1,000 test images on one shared CPU core.
CIFAR_CALIBRATION_IMAGES = 500
CIFAR_TEST_IMAGES = 1000


def add_data_arguments(parser):
    """Add the options that select the model and the images."""
    parser.add_argument(
        "--weights", type=Path, default=None, metavar="PATH",
        help="pretrained CIFAR ResNet file (.th, written by torch.save); its depth is read "
             "from the weights. Requires --data. Default: train the digits CNN.",
    )
    parser.add_argument(
        "--data", type=Path, default=None, metavar="FOLDER",
        help="folder that contains cifar10_calibration.npz and cifar10_test.npz "
             "(only with --weights)",
    )
    parser.add_argument(
        "--n-calibration", type=int, default=None, metavar="N",
        help="number of calibration images for the input statistics. Default: the whole "
             f"calibration split of the digits, or {CIFAR_CALIBRATION_IMAGES} CIFAR-10 images",
    )
    parser.add_argument(
        "--calibration", choices=("split", "photos"), default="split",
        help="source of the calibration images: the calibration split of the data set "
             "(default), or random 32 x 32 crops of the two photos bundled with scikit-learn, "
             "to test statistics from another image source (only with --weights)",
    )
    parser.add_argument(
        "--n-test", type=int, default=None, metavar="N",
        help="number of test images for the accuracy. Default: the whole test split of the "
             f"digits, or {CIFAR_TEST_IMAGES} CIFAR-10 images",
    )


def add_compression_arguments(parser):
    """Add the options of the compressions and of the output."""
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=[0.5, 0.33, 0.25], metavar="RATIO",
        help="fractions of the weights that each compressed layer keeps (default: 0.5 0.33 0.25)",
    )
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=["tucker2", "cp4"], metavar="METHOD",
        help="factorisations to compare, from tucker2, cp4 and cp3 (default: tucker2 cp4)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N",
        help="seed of the digits split, the digits CNN training and the decompositions "
             "(default: 0)",
    )
    parser.add_argument(
        "--n-iter-max", type=int, default=30, metavar="N",
        help="maximum number of sweeps of each decomposition (default: 30)",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("."), metavar="FOLDER",
        help=f"folder for the figure {FIGURE_NAME}; created if missing (default: the current "
             "folder)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="number of CPU threads for PyTorch. Default: 1 for the digits CNN, whose tensors "
             "are so small that more threads only add synchronisation and slow down sharply "
             "when other processes share the cores. With --weights: PyTorch's default",
    )
    parser.add_argument("--quiet", action="store_true", help="hide the progress bars")


def build_parser():
    """Return the command-line parser of this example."""
    parser = argparse.ArgumentParser(
        description=(
            "Compress the convolutions of a CNN with Tucker-2 and CP, fitted in the input "
            "statistics' metric (norm 'sigma') and in the Frobenius norm, and compare the "
            "top-1 accuracy. Without --weights, a small CNN is trained on scikit-learn's "
            "8x8 digits first."
        )
    )
    add_data_arguments(parser)
    add_compression_arguments(parser)
    return parser


def parse_arguments(argv=None):
    """Parse and check the command-line arguments, from ``sys.argv`` when ``argv`` is None.

    In a Jupyter kernel ``sys.argv`` contains the kernel's own options, so the defaults are used.
    """
    if argv is None and IN_JUPYTER:
        argv = []
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.weights is None) != (args.data is None):
        parser.error("--weights and --data must be given together")
    if args.calibration == "photos" and args.weights is None:
        parser.error("--calibration photos needs --weights: the crops are RGB images for a "
                     "CIFAR ResNet, not 8x8 grey digits")
    for option in ("n_calibration", "n_test", "n_iter_max", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1; got {value}")
    for ratio in args.ratios:
        if not 0 < ratio <= 1:
            parser.error(f"every value of --ratios must be in (0, 1]; got {ratio}")
    # Check the files before the run, so a typo does not end a long run with a traceback.
    if args.output.exists() and not args.output.is_dir():
        parser.error(f"--output must be a folder; {args.output} is a file")
    if args.weights is not None and args.weights.is_dir():
        parser.error(f"--weights must be a file; {args.weights} is a folder")
    if args.weights is not None and not args.weights.is_file():
        parser.error(f"--weights: file not found: {args.weights}")
    if args.data is not None:
        for name in ("cifar10_calibration.npz", "cifar10_test.npz"):
            if not (args.data / name).is_file():
                parser.error(f"--data: {args.data} has no {name}")
    return args


args = parse_arguments()

# %%
# The model and the data
# ----------------------
# The digits CNN is trained on the training part of a stratified split of scikit-learn's
# 1,797 digits. The calibration part (20 % of the images) provides the input statistics and
# the test part (another 20 %) measures the accuracy. With ``--weights`` a pretrained CIFAR
# ResNet is loaded instead, and its calibration images come from the CIFAR-10 training split.

import matplotlib

if "matplotlib.pyplot" not in sys.modules and not IN_JUPYTER:
    # Run from the command line: draw into image files only, which needs no display. Under
    # Jupyter, or where pyplot is already loaded (sphinx-gallery), the backend is kept.
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from tensorly_datc.data import evaluate_accuracy, image_crops, load_cifar10
from tensorly_datc.models import load_cifar_resnet, load_digits_split, train_digits_cnn
from tensorly_datc.nn import collect_input_statistics, compress, recalibrate_batchnorm

# The digits CNN runs on one thread unless --threads sets another count (see its help).
if args.threads is not None:
    torch.set_num_threads(args.threads)
elif args.weights is None:
    torch.set_num_threads(1)


def take(images, labels, n, split_name):
    """Return the first ``n`` images and labels, or all of them when ``n`` is None."""
    if n is None:
        return images, labels
    if n > len(images):
        raise SystemExit(f"--n-{split_name} is {n}, but the {split_name} split has only "
                         f"{len(images)} images")
    return images[:n], labels[:n]


def load_digits_problem(args):
    """Return the name and the trained digits CNN, calibration images and test (images, labels)."""
    model = train_digits_cnn(random_state=args.seed, progress=not args.quiet)
    split = load_digits_split(random_state=args.seed)
    calibration_images, _ = take(*split.calibration, args.n_calibration, "calibration")
    test = take(*split.test, args.n_test, "test")
    return "digits CNN", model, calibration_images, test


def load_cifar_problem(args):
    """Return the name and the CIFAR ResNet, calibration images and test (images, labels)."""
    try:
        model = load_cifar_resnet(args.weights)
    except ValueError as error:
        raise SystemExit(f"--weights: {error}") from error
    n_calibration = args.n_calibration or CIFAR_CALIBRATION_IMAGES
    n_test = args.n_test or CIFAR_TEST_IMAGES
    if args.calibration == "photos":
        calibration_images = image_crops(n_calibration, size=32, random_state=args.seed)
    else:
        images, labels = load_cifar10(args.data / "cifar10_calibration.npz")
        calibration_images, _ = take(images, labels, n_calibration, "calibration")
    test = take(*load_cifar10(args.data / "cifar10_test.npz"), n_test, "test")
    return f"CIFAR ResNet-{model.depth}", model, calibration_images, test


start = time.perf_counter()
if args.weights is None:
    model_name, model, calibration_images, test = load_digits_problem(args)
    print(f"Trained the {model_name} in {time.perf_counter() - start:.1f} s")
else:
    model_name, model, calibration_images, test = load_cifar_problem(args)
    print(f"Loaded the {model_name} and the images in {time.perf_counter() - start:.1f} s")

start = time.perf_counter()
baseline_accuracy = evaluate_accuracy(model, *test)
print(f"Uncompressed top-1 accuracy on {len(test[0])} test images: {baseline_accuracy:.1%} "
      f"({time.perf_counter() - start:.1f} s)")

# %%
# Input statistics
# ----------------
# One pass over the calibration images records, for every convolution, the second moment
# :math:`\Sigma = E[x x^T]` of its im2col input patches, summed in float64. The statistics
# depend only on the original model, so they are collected once and reused for every method,
# ratio and norm below. The stem ``conv1`` is excluded from the compression.

EXCLUDE = ["conv1"]
input_size = tuple(calibration_images.shape[1:])

start = time.perf_counter()
statistics = collect_input_statistics(model, calibration_images, progress=not args.quiet)
source = "photo crops" if args.calibration == "photos" else "calibration images"
print(f"Collected the input statistics of {len(statistics)} layers from "
      f"{len(calibration_images)} {source} in {time.perf_counter() - start:.1f} s")

# %%
# Compression at several parameter ratios
# ---------------------------------------
# Each compressed layer keeps at most the given fraction of its weights, with ranks solved
# per layer. The parameter and MAC counts below cover the compressed layers only. The same
# ranks are used in both norms, so the two rows of a method and ratio differ only in the norm
# of the fit.

decomposition_options = {"n_iter_max": args.n_iter_max, "random_state": args.seed}


def compress_and_evaluate(method, ratio, norm):
    """Compress the model and measure its accuracy; return the result row, model and report."""
    start = time.perf_counter()
    compressed, report = compress(
        model, statistics, method=method, param_ratio=ratio, norm=norm, exclude=EXCLUDE,
        progress=not args.quiet, input_size=input_size,
        decomposition_options=decomposition_options,
    )
    accuracy = evaluate_accuracy(compressed, *test)
    row = dict(method=method, norm=norm, ratio=ratio, accuracy=accuracy,
               seconds=time.perf_counter() - start, **report.totals())
    return row, compressed, report


def format_row(row):
    """Return one line of the result table."""
    params = f"{row['params_before']:,} -> {row['params_after']:,}"
    if row["macs_before"]:
        macs = f"{row['macs_before']:,} -> {row['macs_after']:,}"
    else:
        macs = "-"
    return (f"{row['method']:<8} {row['norm']:<10} {row['ratio']:>5.2f}  {params:>26}  "
            f"{macs:>26}  {row['accuracy']:>6.1%}  {row['seconds']:>6.1f}")


# The compressed model of the first method at the smallest ratio, in the metric, is kept for
# the last part of the example.
strongest = (args.methods[0], min(args.ratios), "sigma")
rows, reports = [], {}
for method in args.methods:
    for ratio in args.ratios:
        for norm in NORMS:
            key = (method, ratio, norm)
            row, compressed, reports[key] = compress_and_evaluate(*key)
            rows.append(row)
            if key == strongest:
                one_shot = compressed

header = (f"{'method':<8} {'norm':<10} {'ratio':>5}  {'params (compressed layers)':>26}  "
          f"{'MACs (compressed layers)':>26}  {'top-1':>6}  {'time s':>6}")
print(f"\n{model_name}, uncompressed top-1 {baseline_accuracy:.1%}")
print(header)
print("-" * len(header))
for row in rows:
    print(format_row(row))

# %%
# The per-layer report of the first method at the smallest ratio lists the ranks and the
# relative errors of each layer. The metric error, the relative change of the layer's output on
# the calibration data, is what the 'sigma' fit minimises.

print(reports[strongest])

# %%
# Beyond one-shot compression
# ---------------------------
# The one-shot fits above match each layer to the original model's inputs, so the errors of
# consecutive layers add up. Two remedies need no training. The first re-estimates the
# running statistics of the BatchNorm layers of the compressed model on the calibration
# images (:func:`tensorly_datc.nn.recalibrate_batchnorm`). The second, sequential calibration
# (``calibration='sequential'``), compresses the layers in forward order and fits each one to
# its inputs in the partially compressed model. Both are shown here for the first method at
# the smallest ratio, in the metric.


def compress_sequentially(method, ratio):
    """Compress with sequential calibration and return the compressed model."""
    compressed, _ = compress(
        model, calibration_images, method=method, param_ratio=ratio, exclude=EXCLUDE,
        calibration="sequential", progress=not args.quiet,
        decomposition_options=decomposition_options,
    )
    return compressed


def report_accuracy(label, compressed, start):
    """Print the test accuracy of ``compressed`` and the seconds since ``start``."""
    accuracy = evaluate_accuracy(compressed, *test)
    print(f"{label:<52} top-1 {accuracy:6.1%}  ({time.perf_counter() - start:.1f} s)")


method, ratio, _ = strongest
print(f"\n{method} at ratio {ratio:.2f}, norm 'sigma':")
report_accuracy("one-shot (from the table)", one_shot, time.perf_counter())
start = time.perf_counter()
recalibrate_batchnorm(one_shot, calibration_images, progress=not args.quiet)
report_accuracy("one-shot, BatchNorm statistics re-estimated", one_shot, start)

start = time.perf_counter()
sequential = compress_sequentially(method, ratio)
report_accuracy("sequential calibration", sequential, start)
start = time.perf_counter()
recalibrate_batchnorm(sequential, calibration_images, progress=not args.quiet)
report_accuracy("sequential, BatchNorm statistics re-estimated", sequential, start)

# %%
# Accuracy against parameters
# ---------------------------
# Each method has one colour. Solid lines show the fits in the input statistics' metric and
# dashed lines the Frobenius fits. The dotted line is the accuracy of the uncompressed model.

LINE_STYLES = {"sigma": "-", "frobenius": "--"}
# Distinct markers too, so the norms stay apart when each line has a single point.
MARKERS = {"sigma": "o", "frobenius": "x"}
NORM_LABELS = {"sigma": "metric (Sigma)", "frobenius": "Frobenius"}
colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

figure, axes = plt.subplots(figsize=(7, 4.5))
for index, method in enumerate(args.methods):
    for norm in NORMS:
        points = sorted((row["params_after"], row["accuracy"]) for row in rows
                        if row["method"] == method and row["norm"] == norm)
        params, accuracies = zip(*points)
        axes.plot(params, [100 * value for value in accuracies], LINE_STYLES[norm], marker=MARKERS[norm],
                  color=colours[index % len(colours)], label=f"{method}, {NORM_LABELS[norm]}")
axes.axhline(100 * baseline_accuracy, color="grey", linestyle=":", label="uncompressed")
axes.set_xlabel("parameters of the compressed layers")
axes.set_ylabel("top-1 accuracy (%)")
axes.set_title(f"{model_name}: compression without fine-tuning")
axes.legend(fontsize="small")
figure.tight_layout()

args.output.mkdir(parents=True, exist_ok=True)
figure_path = args.output / FIGURE_NAME
figure.savefig(figure_path, dpi=120)
print(f"Saved the figure to {figure_path}")
