"""Drop-in modules: the regularized loss (and, with the kernels, fused activations)."""
from gradreg_fast.nn.loss import GradRegLoss

__all__ = ["GradRegLoss"]
