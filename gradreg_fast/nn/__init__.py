"""Drop-in modules: the regularized loss and fused activations."""
from gradreg_fast.nn.activations import FusedActivation, FusedLinearAct
from gradreg_fast.nn.embeddings import FromEmbeddings
from gradreg_fast.nn.fuse import fuse
from gradreg_fast.nn.loss import GradRegLoss

__all__ = ["GradRegLoss", "FromEmbeddings", "FusedActivation", "FusedLinearAct", "fuse"]
