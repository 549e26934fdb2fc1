"""Metric-weighted tensor decompositions."""

from ._cp import WeightedCP, weighted_parafac
from ._tucker2 import WeightedTucker2, weighted_tucker2

__all__ = ["weighted_tucker2", "WeightedTucker2", "weighted_parafac", "WeightedCP"]
