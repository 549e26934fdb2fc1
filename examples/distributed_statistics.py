"""Collect input statistics and compress a CNN on several processes with torch.distributed.

Each process runs the digits CNN on its own shard of the calibration images, chosen by a
:class:`~torch.utils.data.DistributedSampler`. :func:`tensorly_datc.nn.collect_input_statistics`
sums the shards' moments over the process group, so every process gets the statistics of all
calibration images. :func:`tensorly_datc.nn.compress` then lets process ``i % world_size``
decompose the ``i``-th layer and broadcasts each replacement, so every process ends with the
same compressed model. Process 0 prints the report and the test accuracy.

Run it with two processes on the CPU (gloo backend)::

    torchrun --nproc_per_node=2 examples/distributed_statistics.py

or with one GPU per process::

    torchrun --nproc_per_node=2 examples/distributed_statistics.py --backend nccl

Run ``python examples/distributed_statistics.py --help`` for all options.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tensorly_datc.data import evaluate_accuracy
from tensorly_datc.models import DigitsCNN, load_digits_split, train_digits_cnn
from tensorly_datc.nn import collect_input_statistics, compress

BACKENDS = ("gloo", "nccl")
METHODS = ("tucker2", "cp4", "cp3")


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="gloo",
        help="torch.distributed backend: gloo runs on the CPU, nccl on one GPU per process "
        "(default: gloo)",
    )
    parser.add_argument(
        "--method", choices=METHODS, default="tucker2", help="factorisation (default: tucker2)"
    )
    parser.add_argument(
        "--param-ratio",
        type=float,
        default=0.5,
        help="fraction of each compressed layer's weights to keep, in (0, 1] (default: 0.5)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="calibration images per forward pass on each process (default: 64)",
    )
    parser.add_argument(
        "--random-state",
        type=int,
        default=0,
        help="seed of the data split, the training and the decompositions (default: 0)",
    )
    return parser.parse_args()


def select_device(backend):
    """Return this process's device: its own GPU for nccl, the CPU for gloo."""
    if backend != "nccl":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("--backend nccl needs CUDA GPUs, but torch finds none; use --backend gloo")
    # torchrun sets LOCAL_RANK, the index of this process on its machine.
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    return device


def trained_model(random_state, device):
    """Train the digits CNN on process 0 and send its weights to the other processes."""
    payload = [None]
    if dist.get_rank() == 0:
        payload = [train_digits_cnn(random_state).state_dict()]
    dist.broadcast_object_list(payload, src=0)
    model = DigitsCNN()
    model.load_state_dict(payload[0])
    return model.to(device).eval()


def main():
    arguments = parse_arguments()
    if "RANK" not in os.environ:
        raise SystemExit(
            "start this script with torchrun, for example: "
            "torchrun --nproc_per_node=2 examples/distributed_statistics.py"
        )
    device = select_device(arguments.backend)
    # torchrun passes the rendezvous address, rank and world size in environment variables.
    dist.init_process_group(arguments.backend)
    try:
        run(arguments, device)
    finally:
        dist.destroy_process_group()


def run(arguments, device):
    rank = dist.get_rank()
    split = load_digits_split(arguments.random_state)
    model = trained_model(arguments.random_state, device)

    # Each process collects the statistics of its shard, and the call combines them over the
    # group. When the images do not divide evenly, DistributedSampler repeats up to
    # world_size - 1 of them so that all shards have the same length.
    calibration = TensorDataset(*split.calibration)
    sampler = DistributedSampler(calibration, shuffle=False)
    loader = DataLoader(calibration, batch_size=arguments.batch_size, sampler=sampler)
    statistics = collect_input_statistics(model, loader, progress=False)

    # Each process decomposes its share of the layers; all end with the same model.
    compressed, report = compress(
        model,
        statistics,
        method=arguments.method,
        param_ratio=arguments.param_ratio,
        input_size=split.calibration[0].shape[1:],
        decomposition_options={"random_state": arguments.random_state},
        progress=False,
    )

    if rank == 0:
        images, labels = split.test
        print(f"{dist.get_world_size()} processes, backend {dist.get_backend()}")
        print(f"calibration images on process 0: {len(sampler)} of {len(calibration)}")
        print(report)
        print(f"test accuracy: {evaluate_accuracy(model, images, labels):.4f} original, "
              f"{evaluate_accuracy(compressed, images, labels):.4f} compressed")


if __name__ == "__main__":
    main()
