"""Custom ops (torch.library) of gradreg_fast with fake kernels, autograd and backend dispatch.

Each public function takes ``backend=None`` (see gradreg_fast._backend): "reference", "cpp",
"cuda", "triton" or "auto".
"""
from gradreg_fast.ops.sq_norm import sq_norm
from gradreg_fast.ops.bias_act import ACTIVATIONS, bias_act

__all__ = ["sq_norm"]
__all__ += ["ACTIVATIONS", "bias_act"]
