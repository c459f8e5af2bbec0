"""The Philox Gaussian stream, ``project`` and ``gaussian_like`` on every backend.

1. Philox 4x32-10 against Random123's published known-answer vectors and an independent scalar
   Python implementation written in this file.
2. The stream on every backend against the reference, to the bit (fresh seeds each run; the seeds
   are in the failure message).
3. Statistics of the stream (mean, variance, kurtosis, normality, correlations within a Box–Muller
   pair, across Philox words, across samples and across (seed, offset)), each with a threshold of
   5 standard errors.
4. The ops: values, fp64 gradcheck and gradgradcheck, opcheck, fp16/bf16/fp32, non-contiguous
   input, batch of 1, empty batch, bad input, nothing saved for backward, and SpectReg built on
   ``project`` against gradreg_fast.reference.spectreg with the same r.
"""
import math
import random

import pytest
import torch

import gradreg_fast as gr
from conftest import TOLERANCES, assert_close_to_reference, backend_params
from gradreg_fast.ops import gaussian_like, project
from gradreg_fast.reference import philox as P
from gradreg_fast.testing.zoo import make_small as make

FAST = [p for p in backend_params() if p.values[1] != "reference"]
OPS_BACKENDS = [p for p in backend_params() if p.values[1] in ("cpp", "cuda", "triton")]
_rng = random.SystemRandom()


def fresh_seed() -> int:
    return _rng.getrandbits(64)


def fresh_offset() -> int:
    return _rng.choice([0, 1, _rng.getrandbits(20), _rng.getrandbits(63)])


# -- 1. Philox known answers ------------------------------------------------------------------------

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key) -> output words.
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def scalar_philox(counter, key):
    """Philox 4x32-10 from its definition, on Python integers (independent of the module)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert scalar_philox(counter, key) == expected
    words = P.philox4x32_10(tuple(torch.tensor([c]) for c in counter), key)
    assert tuple(int(w) for w in words) == expected


def test_philox_vectorized_matches_scalar_on_random_counters():
    n = 64
    counters = [tuple(_rng.getrandbits(32) for _ in range(4)) for _ in range(n)]
    key = (_rng.getrandbits(32), _rng.getrandbits(32))
    words = P.philox4x32_10(tuple(torch.tensor([c[j] for c in counters]) for j in range(4)), key)
    for i, c in enumerate(counters):
        assert tuple(int(w[i]) for w in words) == scalar_philox(c, key), f"counter {c}, key {key}"


def box_muller_float32(w_radius, w_angle):
    """Box–Muller of two words with Python's math (float64), rounded to float32 by numpy-free means."""
    rho = math.sqrt(-2.0 * math.log((w_radius + 1) * 2.0 ** -32))
    theta = 6.283185307179586 * (w_angle * 2.0 ** -32)
    return [torch.tensor(rho * math.cos(theta), dtype=torch.float64).float().item(),
            torch.tensor(rho * math.sin(theta), dtype=torch.float64).float().item()]


@pytest.mark.parametrize("device,backend", backend_params())
def test_stream_start_is_the_known_answer(device, backend):
    """Stream (seed 0, offset 0), block 0 is Philox at counter 0, key 0: the first KAT vector."""
    w = KAT[0][2]
    expected = torch.tensor(box_muller_float32(w[0], w[1]) + box_muller_float32(w[2], w[3]))
    z = gaussian_like(torch.empty(1, 4, device=device), 0, 0, backend=backend)
    assert torch.equal(z.cpu().reshape(-1), expected)


# -- 2. the same stream on every backend ------------------------------------------------------------

def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float().cpu().view(torch.int32).long() - b.float().cpu().view(torch.int32).long()).abs()


def assert_same_stream(out, expected, context):
    """Bit-identical, but for at most 1 in 10^6 elements off by 1 ulp (float64 libm differences)."""
    assert out.shape == expected.shape and out.dtype == expected.dtype, context
    dist = ulp_distance(out, expected)
    allowed = max(1, out.numel() // 10 ** 6) if out.numel() else 0
    assert dist.max().item() <= 1 if dist.numel() else True, f"{context}: max ulp {dist.max().item()}"
    assert (dist > 0).sum().item() <= allowed, f"{context}: {(dist > 0).sum().item()} elements differ"


@pytest.mark.parametrize("device,backend", FAST)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 4), (5, 3, 7), (4, 257)])
@pytest.mark.parametrize("per_sample", [True, False])
def test_gaussian_like_matches_reference(device, backend, shape, per_sample):
    seed, offset = fresh_seed(), fresh_offset()
    x = torch.randn(shape, device=device)
    out = gaussian_like(x, seed, offset, per_sample=per_sample, backend=backend)
    expected = P.gaussian_like(x.cpu(), seed, offset, per_sample=per_sample)
    assert out.device == x.device
    assert_same_stream(out, expected, f"seed={seed} offset={offset} shape={shape}")


@pytest.mark.parametrize("device,backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_gaussian_like_other_dtypes_are_the_float32_stream_converted(device, backend, dtype):
    seed, offset = fresh_seed(), fresh_offset()
    x = torch.randn(3, 37, device=device).to(dtype)
    out = gaussian_like(x, seed, offset, backend=backend)
    assert out.dtype == dtype
    expected = P.normal_stream(seed, offset, x.numel()).reshape(3, 37).to(dtype)
    assert torch.equal(out.cpu(), expected), f"seed={seed} offset={offset}"


def test_large_stream_cpp_matches_reference():
    """Many elements (2^20) on the C++ backend: exercises the threaded fill and the ulp claim."""
    if not gr.backends()["cpp"].available:
        pytest.skip("C++ backend not built")
    seed, offset = fresh_seed(), fresh_offset()
    x = torch.empty(16, 2 ** 16)
    out = gaussian_like(x, seed, offset, backend="cpp")
    assert_same_stream(out, P.gaussian_like(x, seed, offset), f"seed={seed} offset={offset}")


# -- 3. statistics of the stream ---------------------------------------------------------------------

N_STAT = 2 ** 18
SIGMAS = 5.0


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a * b).sum().item() / math.sqrt((a * a).sum().item() * (b * b).sum().item())


def test_stream_moments_and_normality():
    seed, offset = fresh_seed(), fresh_offset()
    z = P.normal_stream(seed, offset, N_STAT).double()
    n, ctx = z.numel(), f"seed={seed} offset={offset}"
    assert abs(z.mean().item()) <= SIGMAS / math.sqrt(n), ctx                       # SE of the mean: 1/√n
    assert abs(z.var().item() - 1) <= SIGMAS * math.sqrt(2 / n), ctx              # var of z²: 2
    assert abs(z.pow(4).mean().item() - 3) <= SIGMAS * math.sqrt(96 / n), ctx     # var of z⁴: 105 - 9
    assert abs(z.pow(3).mean().item()) <= SIGMAS * math.sqrt(15 / n), ctx         # var of z³: 15
    # Kolmogorov–Smirnov against Φ: P(√n·D > 2.69) ≈ 1e-6
    zs = z.sort().values
    cdf = torch.special.ndtr(zs)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    d = torch.maximum((grid - cdf).abs(), (cdf - (grid - 1 / n)).abs()).max().item()
    assert d * math.sqrt(n) <= 2.69, f"{ctx}: KS statistic {d:.3g}"


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 8, 1024])
def test_stream_uncorrelated_at_lags(lag):
    """Lag 1 includes the Box–Muller partners (cos, sin of one pair) and lag 4 the same lane of the
    next Philox block; squares are checked too (Box–Muller partners share the radius)."""
    seed, offset = fresh_seed(), fresh_offset()
    z = P.normal_stream(seed, offset, N_STAT + lag)
    bound = SIGMAS / math.sqrt(N_STAT)
    assert abs(corr(z[:-lag], z[lag:])) <= bound, f"seed={seed} offset={offset}"
    # corr of z² has SE 1/√n too (independent z)
    assert abs(corr(z[:-lag].double() ** 2, z[lag:].double() ** 2)) <= bound, f"seed={seed} offset={offset}"


@pytest.mark.parametrize("lanes", [(0, 1), (2, 3), (0, 2), (1, 3), (0, 3)])
def test_stream_lanes_independent(lanes):
    """Within one Philox block: the Box–Muller partners and the two word pairs."""
    seed, offset = fresh_seed(), fresh_offset()
    z = P.normal_stream(seed, offset, N_STAT).reshape(-1, 4).double()
    a, b = z[:, lanes[0]], z[:, lanes[1]]
    bound = SIGMAS / math.sqrt(a.numel())
    assert abs(corr(a, b)) <= bound and abs(corr(a * a, b * b)) <= bound, f"seed={seed} offset={offset}"
    for lane in lanes:  # each lane on its own is standard normal
        assert abs(z[:, lane].mean().item()) <= SIGMAS / math.sqrt(a.numel())
        assert abs(z[:, lane].var().item() - 1) <= SIGMAS * math.sqrt(2 / a.numel())


def test_per_sample_tangents_independent_across_samples():
    seed, offset = fresh_seed(), fresh_offset()
    v = P.gaussian_like(torch.empty(64, 4096), seed, offset).double()
    c = torch.corrcoef(v)  # (64, 64) correlations between samples
    off_diag = c[~torch.eye(64, dtype=torch.bool)]
    assert off_diag.abs().max().item() <= SIGMAS / math.sqrt(4096) + 1.0 / 4096, f"seed={seed}"


@pytest.mark.parametrize("change", ["seed+1", "offset+1", "seed-bit63", "offset-bit40"])
def test_different_seed_or_offset_gives_a_different_stream(change):
    seed, offset = fresh_seed() >> 1, fresh_offset() >> 1
    other = {"seed+1": (seed + 1, offset), "offset+1": (seed, offset + 1),
             "seed-bit63": (seed ^ (1 << 63), offset), "offset-bit40": (seed, offset ^ (1 << 40))}[change]
    n = N_STAT // 4
    a = P.normal_stream(seed, offset, n)
    b = P.normal_stream(*other, n)
    assert abs(corr(a, b)) <= SIGMAS / math.sqrt(n), f"seed={seed} offset={offset} vs {other}"
    # not a shifted copy either: no two consecutive values of b occur consecutively in a (single
    # float32 values do collide by chance, ~100 times here; a pair collides with probability ~1e-5)
    def pairs(z):
        bits = z.view(torch.int32).long() & 0xFFFFFFFF
        return (bits[:-1] << 31) ^ bits[1:]
    common = torch.isin(pairs(b), pairs(a)).sum().item()
    assert common <= 1, f"seed={seed} offset={offset} vs {other}: {common} shared consecutive pairs"
    assert torch.equal(a, P.normal_stream(seed, offset, n)), "the same (seed, offset) must repeat"


# -- 4. the ops ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("shape", [(5, 7), (1, 10), (6, 1), (3, 130)])
def test_project_value_fp64(device, backend, per_sample, shape):
    seed, offset = fresh_seed(), fresh_offset()
    out = torch.randn(shape, dtype=torch.float64, device=device)
    r = P.projection_vectors(shape[0], shape[1], seed, offset, per_sample=per_sample,
                             dtype=torch.float64, device=device)
    s = project(out, seed, offset, per_sample=per_sample, backend=backend)
    assert s.shape == (shape[0],) and s.dtype == torch.float64
    torch.testing.assert_close(s, (out * r).sum(1), **TOLERANCES[torch.float64])
    g = torch.randn(shape[0], dtype=torch.float64, device=device)
    out_r = out.clone().requires_grad_(True)
    (d_out,) = torch.autograd.grad(project(out_r, seed, offset, per_sample=per_sample, backend=backend), out_r, g)
    torch.testing.assert_close(d_out, g[:, None] * r, rtol=0, atol=0)  # one rounding: exact


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("per_sample", [False, True])
def test_project_gradcheck_and_gradgradcheck(device, backend, per_sample):
    seed, offset = fresh_seed(), fresh_offset()
    shape = (2, 3) if backend == "triton" else (4, 6)  # the interpreter launches slowly
    out = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda t: project(t, seed, offset, per_sample=per_sample, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (out,))
    assert torch.autograd.gradgradcheck(fn, (out,))


@pytest.mark.parametrize("device,backend", backend_params())
def test_project_backward_differentiable_in_grad(device, backend):
    """Third order through the backward op: d/d(grad_s) of the backward is again a projection."""
    seed, offset = fresh_seed(), fresh_offset()
    B, K = (2, 3) if backend == "triton" else (3, 5)  # the interpreter launches slowly
    out = torch.randn(B, K, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(B, K, dtype=torch.float64, device=device)

    def first_order(gs):
        s = project(out, seed, offset, per_sample=True, backend=backend)
        (d_out,) = torch.autograd.grad(s, out, gs, create_graph=True)
        return (d_out * w).sum(1) + project(d_out, seed, offset + 1, backend=backend)
    gs = torch.randn(B, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(first_order, (gs,))
    assert torch.autograd.gradgradcheck(first_order, (gs,))


OP_NAMES = {"cpp": ("project", "project_backward", "gaussian_like"),
            "cuda": ("project", "project_backward", "gaussian_like"),
            "triton": ("project_triton", "project_backward_triton", "gaussian_like_triton")}


@pytest.mark.parametrize("device,backend", OPS_BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_opcheck(device, backend, per_sample):
    seed = P.seed_to_int64(fresh_seed())
    proj, back, gauss = (getattr(torch.ops.gradreg_fast, n).default for n in OP_NAMES[backend])
    out = torch.randn(4, 5, device=device, requires_grad=True)
    torch.library.opcheck(proj, (out, seed, 3, per_sample))
    torch.library.opcheck(back, (torch.randn(4, device=device, requires_grad=True), seed, 3, per_sample, 5,
                                 torch.float32))
    torch.library.opcheck(gauss, (torch.randn(3, 2, 5, device=device), seed, 3, per_sample))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_sample", [False, True])
def test_project_low_precision(device, backend, dtype, per_sample):
    """float32 math: error at most twice that of the naive composite in the same dtype."""
    seed, offset = fresh_seed(), fresh_offset()
    out = (torch.randn(6, 300, device=device) * 3).to(dtype)
    r32 = P.projection_vectors(6, 300, seed, offset, per_sample=per_sample, device=device)
    s = project(out, seed, offset, per_sample=per_sample, backend=backend)
    assert s.dtype == torch.float32
    exact = (out.double() * r32.double()).sum(1)
    same_dtype = (out * r32.to(dtype)).sum(1)
    assert_close_to_reference(s, same_dtype, exact)
    out_r = out.clone().requires_grad_(True)
    g = torch.randn(6, device=device)
    (d_out,) = torch.autograd.grad(project(out_r, seed, offset, per_sample=per_sample, backend=backend), out_r, g)
    assert d_out.dtype == dtype
    assert torch.equal(d_out, (g[:, None] * r32.expand(6, 300)).to(dtype))  # fp32 product, one rounding


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("per_sample", [False, True])
def test_auto_on_small_cpu_inputs_is_the_kernels_projection(dtype, per_sample, monkeypatch):
    """backend="auto" on a small CPU input runs project as composite ops (out · r, r drawn by the
    gaussian_like kernel, no custom op in the graph): its gradient Σ_i g_i r_ik equals the C++ op's to
    the bit (the same r, the same one product in the accumulation dtype), its value the op's up to the
    rounding of the sum, and it is differentiable twice as the op is (fp64 gradgradcheck)."""
    if not gr.backends()["cpp"].available:
        pytest.skip("the extension is not built")
    monkeypatch.delenv("GRADREG_BACKEND", raising=False)
    seed, offset = fresh_seed(), fresh_offset()
    out = (torch.randn(6, 30) * 3).to(dtype).requires_grad_(True)
    g = torch.randn(6)
    s_auto = project(out, seed, offset, per_sample=per_sample)
    s_cpp = project(out, seed, offset, per_sample=per_sample, backend="cpp")
    assert "gradreg_fast" not in s_auto.grad_fn.name() and "gradreg_fast" in s_cpp.grad_fn.name()
    assert s_auto.dtype == s_cpp.dtype
    torch.testing.assert_close(s_auto, s_cpp, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-5)
    (d_auto,) = torch.autograd.grad(s_auto, out, g)
    (d_cpp,) = torch.autograd.grad(s_cpp, out, g)
    assert torch.equal(d_auto, d_cpp)
    if dtype == torch.float64:
        torch.autograd.gradgradcheck(lambda o: torch.tanh(project(torch.tanh(o), seed, offset, per_sample=per_sample)),
                                     (out.detach()[:3, :4].clone().requires_grad_(True),))


@pytest.mark.parametrize("device,backend", backend_params())
def test_non_contiguous_input(device, backend):
    seed, offset = fresh_seed(), fresh_offset()
    base = torch.randn(7, 5, dtype=torch.float64, device=device)
    wide = torch.randn(5, 14, dtype=torch.float64, device=device)
    for out in (base.t().contiguous().t(), wide[:, ::2], base.t()):
        before = out.clone()
        s = project(out, seed, offset, per_sample=True, backend=backend)
        torch.testing.assert_close(s, P.project(out.contiguous(), seed, offset, per_sample=True),
                                   **TOLERANCES[torch.float64])
        assert torch.equal(out, before)
        v = gaussian_like(out, seed, offset, backend=backend)
        assert v.is_contiguous() and torch.equal(v, P.gaussian_like(out.contiguous(), seed, offset))
    x = torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last)
    v = gaussian_like(x, seed, offset, backend=backend)
    assert v.is_contiguous() and torch.equal(v.cpu(), P.gaussian_like(x.cpu(), seed, offset))


@pytest.mark.parametrize("device,backend", backend_params())
def test_batch_of_one_and_empty_batch(device, backend):
    seed, offset = fresh_seed(), fresh_offset()
    one = torch.randn(1, 9, dtype=torch.float64, device=device)
    r = P.projection_vectors(1, 9, seed, offset, per_sample=True, dtype=torch.float64, device=device)
    torch.testing.assert_close(project(one, seed, offset, per_sample=True, backend=backend), (one * r).sum(1))
    for per_sample in (False, True):
        empty = torch.randn(0, 5, device=device, requires_grad=True)
        s = project(empty, seed, offset, per_sample=per_sample, backend=backend)
        assert s.shape == (0,)
        (g,) = torch.autograd.grad(s.sum(), empty)
        assert g.shape == (0, 5)
        assert gaussian_like(empty, seed, offset, per_sample=per_sample, backend=backend).shape == (0, 5)


@pytest.mark.parametrize("device,backend", backend_params())
def test_gaussian_like_shared_across_batch(device, backend):
    seed, offset = fresh_seed(), fresh_offset()
    x = torch.randn(5, 3, 7, device=device)
    v = gaussian_like(x, seed, offset, per_sample=False, backend=backend)
    assert torch.equal(v, v[:1].expand_as(v))
    assert torch.equal(v[0].cpu().reshape(-1), P.normal_stream(seed, offset, 21))
    xr = x.clone().requires_grad_(True)
    assert not gaussian_like(xr, seed, offset, backend=backend).requires_grad


@pytest.mark.parametrize("device,backend", FAST)
def test_project_saves_no_random_tensor(device, backend):
    """The backward regenerates r: the fast backends save nothing for backward at all (the
    reference composite out * r saves r by design, so it is not in this test)."""
    saved = []
    out = torch.randn(8, 10, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        s = project(out, 1, 2, per_sample=True, backend=backend)
    assert saved == []
    s.sum().backward()
    assert out.grad.shape == (8, 10)


@pytest.mark.parametrize("device,backend", backend_params())
def test_bad_input(device, backend):
    out = torch.randn(3, 4, device=device)
    with pytest.raises(TypeError, match="floating"):
        project(torch.ones(3, 4, dtype=torch.int64, device=device), 1, 0, backend=backend)
    with pytest.raises(TypeError, match="torch.Tensor"):
        project([[1.0, 2.0]], 1, 0, backend=backend)
    for bad in (torch.randn(3, device=device), torch.randn(2, 3, 4, device=device)):
        with pytest.raises(ValueError, match=r"shape \(B, K\).*reshape"):
            project(bad, 1, 0, backend=backend)
    with pytest.raises(ValueError, match=r"offset must be in \[0, 2\^63\)"):
        project(out, 1, -1, backend=backend)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\^64\)"):
        project(out, -5, 0, backend=backend)
    with pytest.raises(ValueError, match="seed must be in"):
        project(out, 2 ** 64, 0, backend=backend)
    with pytest.raises(TypeError, match="seed must be a Python int"):
        project(out, 1.5, 0, backend=backend)
    with pytest.raises(TypeError, match="offset must be a Python int"):
        project(out, 1, torch.tensor(2), backend=backend)
    with pytest.raises(TypeError, match="per_sample must be a bool"):
        project(out, 1, 0, per_sample=1, backend=backend)
    with pytest.raises(TypeError, match="floating"):
        gaussian_like(torch.ones(3, dtype=torch.int32, device=device), 1, 0, backend=backend)
    with pytest.raises(ValueError, match="batch dimension"):
        gaussian_like(torch.tensor(1.0, device=device), 1, 0, per_sample=False, backend=backend)
    with pytest.raises(ValueError, match="offset"):
        gaussian_like(out, 1, -3, backend=backend)


@pytest.mark.parametrize("device,backend", [p for p in OPS_BACKENDS if p.values[1] != "triton"])
def test_extension_ops_check_their_arguments(device, backend):
    """Direct torch.ops calls (no Python wrapper) fail with a message, not a crash."""
    ops = torch.ops.gradreg_fast
    with pytest.raises(RuntimeError, match="offset must be >= 0"):
        ops.project(torch.randn(2, 3, device=device), 1, -1, False)
    with pytest.raises(RuntimeError, match=r"shape \(B, K\)"):
        ops.project(torch.randn(2, 3, 4, device=device), 1, 0, False)
    with pytest.raises(RuntimeError, match="floating"):
        ops.gaussian_like(torch.ones(2, dtype=torch.int64, device=device), 1, 0, True)
    with pytest.raises(RuntimeError, match=r"grad must have shape \(B,\)"):
        ops.project_backward(torch.randn(2, 2, device=device), 1, 0, False, 3, torch.float32)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        project(torch.randn(2, 3), 1, 0, backend="fast")


# -- SpectReg built on project ------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_spectreg_with_project_equals_reference(device, backend, per_sample, model_name):
    """s = project(f(x)); g = ∂Σs/∂x (create_graph); mean_i ‖g_i‖² equals reference.spectreg with r
    materialized from the reference generator, in value and in parameter gradients (fp64)."""
    model, x, _ = make(model_name, batch=4, k=5)
    model, x = model.to(device), x.to(device)
    seed, offset = fresh_seed(), fresh_offset()
    r = P.projection_vectors(x.shape[0], 5, seed, offset, per_sample=per_sample, dtype=torch.float64,
                             device=device)
    expected = gr.reference.spectreg(model, x, r)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()), materialize_grads=True)

    xi = x.detach().requires_grad_(True)
    s = project(model(xi), seed, offset, per_sample=per_sample, backend=backend)
    (g,) = torch.autograd.grad(s.sum(), xi, create_graph=True)
    ours = g.pow(2).flatten(1).sum(1).mean()
    grads = torch.autograd.grad(ours, list(model.parameters()), materialize_grads=True)
    torch.testing.assert_close(ours, expected, **TOLERANCES[torch.float64])
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("per_sample", [False, True])
def test_spectreg_n_projections_batched_equals_reference(device, backend, per_sample):
    """n draws at offsets offset, offset+1, ...: the n projections stacked to (n, B) and one
    is_grads_batched reverse pass (the shape of penalties.estimators.input_vjps) equal
    reference.spectreg with the (n, B, K) tensor R materialized from the reference generator."""
    n = 3
    model, x, _ = make("mlp", batch=4, k=5)
    model, x = model.to(device), x.to(device)
    seed, offset = fresh_seed(), fresh_offset() >> 1
    R = torch.stack([P.projection_vectors(4, 5, seed, offset + j, per_sample=per_sample, dtype=torch.float64,
                                          device=device).expand(4, 5) for j in range(n)])
    expected = gr.reference.spectreg(model, x, R)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()), materialize_grads=True)

    xi = x.detach().requires_grad_(True)
    u = model(xi)
    S = torch.stack([project(u, seed, offset + j, per_sample=per_sample, backend=backend) for j in range(n)])
    onehot = torch.eye(n, dtype=S.dtype, device=device)[:, :, None].expand(n, n, S.shape[1])
    (g,) = torch.autograd.grad(S, xi, grad_outputs=onehot, is_grads_batched=True, create_graph=True)
    ours = g.pow(2).flatten(2).sum(2).mean(1).mean(0)
    grads = torch.autograd.grad(ours, list(model.parameters()), materialize_grads=True)
    torch.testing.assert_close(ours, expected, **TOLERANCES[torch.float64])
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


def test_draw_seed():
    from gradreg_fast.ops import draw_seed
    seeds = {draw_seed() for _ in range(8)}
    assert all(isinstance(s, int) and 0 <= s < 2 ** 63 for s in seeds) and len(seeds) == 8
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert draw_seed(g1) == draw_seed(g2)
    project(torch.randn(2, 3), draw_seed(g1), 0)  # a drawn seed is accepted by the ops
