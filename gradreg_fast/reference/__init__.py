"""Pure-PyTorch ground truth for every op and penalty of gradreg_fast.

Everything here is written the plain way (explicit loops over classes, create_graph=True),
is twice differentiable, and shares no code with the fast paths it validates.
"""
from gradreg_fast.reference.bias_act import bias_act
from gradreg_fast.reference.fused import cross_entropy, cross_entropy_grad, cross_entropy_hvp, fd_direction
from gradreg_fast.reference.ops import acc_dtype, sq_norm, sq_norm_backward
from gradreg_fast.reference.penalties import (
    confidence_penalty,
    doubleback,
    frobreg,
    jacreg,
    onehot,
    r1,
    random_onehot,
    spectreg,
    weight_decay,
    wgan_gp,
)

__all__ = [
    "acc_dtype", "sq_norm", "sq_norm_backward",
    "doubleback", "spectreg", "frobreg", "jacreg", "onehot", "random_onehot", "r1", "wgan_gp",
    "confidence_penalty", "weight_decay",
    "cross_entropy", "cross_entropy_grad", "cross_entropy_hvp", "fd_direction", "bias_act",
]
