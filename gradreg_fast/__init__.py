"""gradreg_fast: fast gradient and Jacobian penalties for PyTorch.

    import gradreg_fast as gr
    crit = gr.GradRegLoss("spectreg", lam=0.03)
    loss = crit(model, x, y)
    loss.backward()
"""
from gradreg_fast import ops, reference
from gradreg_fast._backend import BACKENDS, backends
from gradreg_fast.nn import GradRegLoss
from gradreg_fast.nn.fuse import fuse
from gradreg_fast.penalties import GAN_KINDS, KINDS, METHODS, confidence_penalty, penalty, weight_decay
from gradreg_fast.penalties.core import ReplayError
from gradreg_fast.penalties.estimators import FDKinkWarning, FDStepWarning
from gradreg_fast.penalties.functional import functional_penalty

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "KINDS", "METHODS", "GradRegLoss", "backends", "confidence_penalty", "ops", "penalty",
    "reference", "weight_decay", "fuse", "functional_penalty", "GAN_KINDS", "FDKinkWarning", "FDStepWarning",
    "ReplayError",
]
