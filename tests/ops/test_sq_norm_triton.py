"""Triton sq_norm: what the shared matrix of test_sq_norm.py (which runs every backend, triton
included) does not cover: opcheck of the Triton ops and the split (atomic) reduction path."""
import pytest
import torch

import gradreg_fast as gr
from conftest import DEVICES, TOLERANCES

pytestmark = pytest.mark.skipif(not gr.backends()["triton"].available,
                                reason="triton backend not available here")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton(device):
    import gradreg_fast.ops.sq_norm  # noqa: F401  (registers the ops)
    x = torch.randn(4, 3, 5, device=device)
    torch.library.opcheck(torch.ops.gradreg_fast.sq_norm_triton.default, (x,))
    torch.library.opcheck(torch.ops.gradreg_fast.sq_norm_backward_triton.default, (torch.randn(4, device=device), x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_split_reduction(device, dtype):
    """Several programs per row combined with an atomic add (the small-batch GPU path)."""
    from gradreg_fast.triton.sq_norm import BLOCK, sq_norm
    x = torch.randn(3, 3 * BLOCK + 17, dtype=dtype, device=device)
    expected = x.double().pow(2).sum(1)
    for split in (1, 2, 4):
        out = sq_norm(x, split=split)
        torch.testing.assert_close(out.double(), expected, **TOLERANCES[dtype])
