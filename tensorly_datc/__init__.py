"""Distribution-aware tensor decompositions for TensorLy.

Tucker-2 and CP decompositions that fit their factors in the norm of a metric
``||(X - X~)_(0) M^{1/2}||_F`` instead of the Frobenius norm, and (in
:mod:`tensorly_datc.nn`) the tools that use them to compress convolutional
networks with the second moment of each layer's inputs as the metric.
"""

from .decomposition import WeightedCP, WeightedTucker2, weighted_parafac, weighted_tucker2

__version__ = "0.1.0"

__all__ = ["weighted_tucker2", "WeightedTucker2", "weighted_parafac", "WeightedCP"]
