"""Custom ops (torch.library) of gradreg_fast with fake kernels, autograd and backend dispatch.

Each public function takes ``backend=None`` (see gradreg_fast._backend): "reference", "cpp",
"cuda", "triton" or "auto".
"""
from gradreg_fast.ops.sq_norm import sq_norm

__all__ = ["sq_norm"]
from gradreg_fast.ops.fd_direction import fd_direction  # noqa: E402
from gradreg_fast.ops.cross_entropy import cross_entropy  # noqa: E402

__all__ += ["fd_direction", "cross_entropy"]
