"""Run the gallery examples as scripts and check what they print and write."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"
API_PAGE = REPO_ROOT / "doc" / "api.rst"

# Generous limit for one example run. A run normally takes 5 to 20 s.
TIMEOUT_S = 300

# One row of the CNN example's table: method, norm, ratio, ..., top-1 in percent, seconds.
TABLE_ROW = re.compile(
    r"^(?P<method>tucker2|cp4|cp3)\s+(?P<norm>sigma|frobenius)\s+(?P<ratio>[\d.]+)\s.*"
    r"\s(?P<accuracy>[\d.]+)%\s+[\d.]+$",
    re.MULTILINE,
)


def run_example(name, *arguments, cwd):
    """Run ``examples/<name>`` in a fresh interpreter and return the completed process.

    The checkout is put on PYTHONPATH, so the library need not be installed. Matplotlib draws
    without a display, and BLAS and PyTorch use one thread each, because the examples' tensors
    are small and several threads per process slow them down when the cores are shared.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / name), *arguments],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )


def check_success(process):
    assert process.returncode == 0, f"stdout:\n{process.stdout}\nstderr:\n{process.stderr}"


def test_weighted_low_rank_example(tmp_path):
    process = run_example("plot_weighted_low_rank.py", cwd=tmp_path)
    check_success(process)

    errors = dict(re.findall(r"^(.+?)\s+relative error to the signal ([\d.]+)", process.stdout,
                             re.MULTILINE))
    assert set(errors) == {"unweighted", "diagonal metric", "inverse covariance"}, process.stdout
    # The example's point: the maximum likelihood fit is closer to the clean signal. The
    # measured errors are 0.67 (unweighted) and 0.30 (inverse covariance), so a factor 1.5 is
    # a wide margin.
    assert float(errors["inverse covariance"]) * 1.5 < float(errors["unweighted"]), process.stdout


def test_compress_cnn_example_help(tmp_path):
    process = run_example("plot_compress_cnn.py", "--help", cwd=tmp_path)
    check_success(process)
    for option in ("--weights", "--data", "--n-calibration", "--n-test", "--ratios", "--methods",
                   "--seed", "--n-iter-max", "--output", "--quiet", "--calibration"):
        assert option in process.stdout


def test_compress_cnn_example_rejects_bad_ratio(tmp_path):
    process = run_example("plot_compress_cnn.py", "--ratios", "1.5", cwd=tmp_path)
    assert process.returncode == 2
    assert "--ratios must be in (0, 1]; got 1.5" in process.stderr


def test_compress_cnn_example_rejects_photos_for_digits(tmp_path):
    process = run_example("plot_compress_cnn.py", "--calibration", "photos", cwd=tmp_path)
    assert process.returncode == 2
    assert "--calibration photos needs --weights" in process.stderr


def test_compress_cnn_example_digits_run(tmp_path):
    output = tmp_path / "figures"
    process = run_example(
        "plot_compress_cnn.py", "--ratios", "0.5", "--methods", "tucker2", "--quiet",
        "--threads", "1", "--output", str(output), cwd=tmp_path,
    )
    check_success(process)

    rows = {(row["method"], row["norm"]): row for row in TABLE_ROW.finditer(process.stdout)}
    assert set(rows) == {("tucker2", "sigma"), ("tucker2", "frobenius")}, process.stdout
    assert all(float(row["ratio"]) == 0.5 for row in rows.values())
    # Measured: 98.3 % in the metric against 51.1 % in the Frobenius norm, so the order of
    # the two is far from rounding.
    sigma_accuracy = float(rows["tucker2", "sigma"]["accuracy"])
    frobenius_accuracy = float(rows["tucker2", "frobenius"]["accuracy"])
    assert sigma_accuracy > frobenius_accuracy, process.stdout

    for label in (r"one-shot \(from the table\)", "one-shot, BatchNorm statistics re-estimated",
                  "sequential calibration", "sequential, BatchNorm statistics re-estimated"):
        assert re.search(rf"^{label}\s+top-1\s+[\d.]+%", process.stdout, re.MULTILINE), label

    figure = output / "compress_cnn.png"
    assert figure.is_file()
    assert figure.stat().st_size > 0
    assert f"Saved the figure to {figure}" in process.stdout


@pytest.mark.data
@pytest.mark.slow
def test_compress_cnn_example_cifar_resnet(tmp_path, data_dir):
    weights = data_dir / "cifar10_resnets" / "resnet20-12fca82f.th"
    process = run_example(
        "plot_compress_cnn.py", "--weights", str(weights), "--data", str(data_dir),
        "--n-calibration", "32", "--n-test", "100", "--ratios", "0.5", "--methods", "tucker2",
        "--quiet", "--output", str(tmp_path), cwd=tmp_path,
    )
    check_success(process)
    assert "CIFAR ResNet-20" in process.stdout
    rows = {(row["method"], row["norm"]) for row in TABLE_ROW.finditer(process.stdout)}
    assert rows == {("tucker2", "sigma"), ("tucker2", "frobenius")}, process.stdout
    assert (tmp_path / "compress_cnn.png").is_file()


@pytest.mark.parametrize(
    "module_name",
    ["tensorly_datc", "tensorly_datc.metric", "tensorly_datc.nn", "tensorly_datc.models",
     "tensorly_datc.data"],
)
def test_api_page_lists_public_names(module_name):
    # The API page lists names by hand, in groups, so a new public name must be added there.
    module = importlib.import_module(module_name)
    page = API_PAGE.read_text()
    section = page.split(f".. currentmodule:: {module_name}\n", 1)
    assert len(section) == 2, f"doc/api.rst has no section for {module_name}"
    module_section = section[1].split(".. currentmodule::", 1)[0]
    listed = set(re.findall(r"^   (\w+)$", module_section, re.MULTILINE))
    missing = sorted(set(module.__all__) - listed)
    assert not missing, f"doc/api.rst does not list {missing} of {module_name}"
