"""Compression of PyTorch models with metric-weighted decompositions."""

from .statistics import (
    InputStatistics,
    collect_input_statistics,
    load_statistics,
    save_statistics,
)

__all__ = ["InputStatistics", "collect_input_statistics", "load_statistics", "save_statistics"]

from ._counting import conv_macs, count_parameters
from .layers import CP_LAYOUTS, cp_conv, low_rank_conv1x1, low_rank_linear, tucker2_conv

__all__ += [
    "CP_LAYOUTS",
    "conv_macs",
    "count_parameters",
    "cp_conv",
    "low_rank_conv1x1",
    "low_rank_linear",
    "tucker2_conv",
]

from .compress import compress, select_layers
from .factorize import factorise_layer, low_rank_factors
from .ranks import factorised_parameters, ranks_for_ratio
from .report import CompressionReport, LayerReport

__all__ += [
    "compress",
    "select_layers",
    "factorise_layer",
    "low_rank_factors",
    "factorised_parameters",
    "ranks_for_ratio",
    "CompressionReport",
    "LayerReport",
]

from .serialization import load_compressed, rebuild_structure, save_compressed, structure_of

__all__ += ["load_compressed", "rebuild_structure", "save_compressed", "structure_of"]

from .allocation import allocate_ranks, rank_ladder
from .batchnorm import recalibrate_batchnorm
from .sequential import collect_cross_statistics, sequential_target

__all__ += [
    "allocate_ranks",
    "rank_ladder",
    "recalibrate_batchnorm",
    "collect_cross_statistics",
    "sequential_target",
]
