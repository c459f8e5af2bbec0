"""Custom ops (torch.library) of gradreg_fast with fake kernels, autograd and backend dispatch.

Each public function takes ``backend=None`` (see gradreg_fast._backend): "reference", "cpp",
"cuda", "triton" or "auto".
"""
from gradreg_fast.ops.bias_act import ACTIVATIONS, bias_act
from gradreg_fast.ops.cross_entropy import cross_entropy
from gradreg_fast.ops.fd_direction import fd_direction
from gradreg_fast.ops.philox import draw_seed, gaussian_like, project
from gradreg_fast.ops.sq_norm import sq_norm

__all__ = [
    "sq_norm", "fd_direction", "cross_entropy", "draw_seed", "gaussian_like", "project",
    "ACTIVATIONS", "bias_act",
]
