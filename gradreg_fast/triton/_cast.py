"""Casting helpers shared by the Triton kernels."""
import triton
import triton.language as tl


@triton.jit
def cast_for_store(v, ptr):
    """v (fp32/fp64) cast to the element type of ``ptr``, rounding to nearest even.

    bfloat16 is rounded explicitly on the fp32 bits (add 0x7FFF plus the lowest kept bit, clear the
    low half) before the cast: Triton's interpreter truncates fp32 → bf16, which doubles the
    rounding error; on GPUs this gives the same result as the hardware conversion. NaN stays NaN.
    """
    ty = ptr.dtype.element_ty
    if ty == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(ty)
    else:
        return v.to(ty)
