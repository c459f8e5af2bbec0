"""torch.compile: custom ops inside compiled regions, and penalties on compiled models.

- Every op of the gradreg_fast namespace passes torch.library.opcheck (schema, fake kernel,
  autograd registration, dynamo/aot tracing), with sample inputs from OP_SAMPLES.
- Every public op wrapper (gradreg_fast.ops.__all__) on every available backend runs inside
  torch.compile(fullgraph=True) with the "eager" and "aot_eager" backends (and inductor once),
  forward and backward, matching eager.
- A model compiled with an aot_autograd backend cannot take double backward: method="exact"
  raises the library's ValueError at penalty time naming the methods that work; the methods in
  COMPILE_EXPECT marked "trains" train it and match the uncompiled model.
"""
import pytest
import torch

import gradreg_fast as gr
from conftest import TOLERANCES, available_backends
from gradreg_fast.penalties.guards import COMPILED_MODEL_METHODS
from gradreg_fast.testing.zoo import make_small
from method_matrix import served_pairs

# Sample inputs per schema op (fp32 CPU). A new op without an entry fails test_all_ops_have_samples.
_ACT = {name: code for code, name in enumerate(gr.ops.ACTIVATIONS)}
OP_SAMPLES = {
    "sq_norm": lambda: (torch.randn(4, 3, 5),),
    "sq_norm_backward": lambda: (torch.randn(4), torch.randn(4, 3, 5)),
    "fd_direction": lambda: (torch.randn(4, 3, 5), torch.randn(4, 3, 5), 1e-3),
    "cross_entropy": lambda: (torch.randn(4, 6), torch.randint(6, (4,))),
    "cross_entropy_backward": lambda: (torch.randn(4), torch.randn(4, 6), torch.randint(6, (4,)),
                                       torch.randn(4, dtype=torch.float64)),
    "cross_entropy_hvp": lambda: (torch.randn(4, 6), torch.rand(4) + 0.5, torch.randn(4, 6),
                                  torch.randint(6, (4,)), torch.randn(4, dtype=torch.float64)),
    "gaussian_like": lambda: (torch.randn(4, 3, 5), 12345, 7, True),
    "project": lambda: (torch.randn(4, 6), 12345, 7, False),
    "project_backward": lambda: (torch.randn(4), 12345, 7, True, 6, torch.float32),
    "bias_act": lambda: (torch.randn(4, 6, 3), torch.randn(6), _ACT["gelu"], 1, 0.0),
    "bias_act_grad": lambda: (torch.randn(4, 6, 3), torch.randn(4, 6, 3), torch.randn(6), None, _ACT["gelu"], 1,
                              0.0),
    "bias_act_grad2": lambda: (torch.randn(4, 6, 3), torch.randn(4, 6, 3), torch.randn(4, 6, 3), torch.randn(6),
                               None, _ACT["silu"], 1, 0.0),
}
# Sample inputs per public op wrapper: callable -> (args, kwargs) without the backend argument.
WRAPPER_SAMPLES = {
    "sq_norm": lambda: ((torch.randn(4, 3, 5, requires_grad=True),), {}),
    "fd_direction": lambda: ((torch.randn(4, 3, 5, requires_grad=True), torch.randn(4, 3, 5, requires_grad=True),
                              1e-3), {}),
    "cross_entropy": lambda: ((torch.randn(4, 6, requires_grad=True), torch.randint(6, (4,))), {}),
    "gaussian_like": lambda: ((torch.randn(4, 3, 5), 12345, 7), {}),
    "project": lambda: ((torch.randn(4, 6, requires_grad=True), 12345, 7), {"per_sample": True}),
    "bias_act": lambda: ((torch.randn(4, 6, 3, requires_grad=True), torch.randn(6, requires_grad=True)),
                         {"act": "silu"}),
}
NOT_OPS = {"draw_seed", "ACTIVATIONS"}   # helpers exported next to the ops
# What each method does with a model compiled by an aot_autograd backend: "trains", or a fragment
# of the library's ValueError ("exact" needs double backward, "jvp" forward-mode AD; aot_autograd
# implements neither).
# hvp and jvp differentiate a functional call of the compiled module's original (same function, no
# compiled region under torch.func), so they train compiled models on every torch version
COMPILE_EXPECT = {"exact": "needs double backward", "hvp": "trains", "fd": "trains", "jvp": "trains"}


def _schema_ops():
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("gradreg_fast::"))


def _base(op: str) -> str:
    return op.removesuffix("_triton")   # the Triton ops share the schema of the C++/CUDA op


def test_all_ops_have_samples():
    missing = {op for op in _schema_ops() if _base(op) not in OP_SAMPLES}
    assert not missing, f"add OP_SAMPLES for {missing}"
    wrappers = set(gr.ops.__all__) - NOT_OPS
    assert wrappers <= set(WRAPPER_SAMPLES), f"add WRAPPER_SAMPLES for {wrappers - set(WRAPPER_SAMPLES)}"


def _opcheck_cases():
    cases = []
    for op in sorted(OP_SAMPLES):
        for name, backend in ((op, "cpp"), (f"{op}_triton", "triton")):
            marks = pytest.mark.skipif(not gr.backends()[backend].available,
                                       reason=f"backend {backend!r} is not available here")
            cases.append(pytest.param(name, marks=marks, id=name))
    return cases


@pytest.mark.parametrize("op", _opcheck_cases())
def test_opcheck(op):
    assert op in _schema_ops(), f"gradreg_fast::{op} is not registered"
    torch.library.opcheck(getattr(torch.ops.gradreg_fast, op).default, OP_SAMPLES[_base(op)]())


def _wrapper_cases():
    return [pytest.param(name, backend, id=f"{name}-{backend}")
            for name in sorted(WRAPPER_SAMPLES) for backend in available_backends("cpu")]


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("name,backend", _wrapper_cases())
def test_op_in_fullgraph_compiled_region(name, backend, compiler):
    torch._dynamo.reset()
    op = getattr(gr.ops, name)
    args, kwargs = WRAPPER_SAMPLES[name]()

    def fn(*a):
        out = op(*a, backend=backend, **kwargs)
        return (out[0] if isinstance(out, tuple) else out) * 3.0

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    out = compiled(*args)
    ref = fn(*args)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32])
    diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if not diff:   # gaussian_like: no gradient by design
        return
    g_out = torch.autograd.grad(out.sum(), diff)
    g_ref = torch.autograd.grad(ref.sum(), diff)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


@pytest.mark.skipif(not gr.backends()["cpp"].available, reason="the extension is not built")
@pytest.mark.slow      # 21 s (--durations); --fast keeps the fullgraph eager/aot_eager traces of every op
def test_op_under_inductor():
    """Inductor (C++ codegen on the CPU) around the cpp op: one small case, forward and backward."""
    torch._dynamo.reset()
    x = torch.randn(5, 7, requires_grad=True)
    fn = torch.compile(lambda t: gr.ops.sq_norm(t, backend="cpp").sqrt() + t.sum(1), fullgraph=True,
                       backend="inductor")
    out = fn(x)
    ref = gr.reference.sq_norm(x).sqrt() + x.sum(1)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32])
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g, g_ref, **TOLERANCES[torch.float32])


def test_compile_expectations_are_declared_and_consistent():
    missing = [m for m in gr.METHODS if m not in COMPILE_EXPECT]
    assert not missing, f"declare in COMPILE_EXPECT what methods {missing} do on a compiled model"
    trains = {m for m, e in COMPILE_EXPECT.items() if e == "trains"}
    assert trains == set(COMPILED_MODEL_METHODS), (
        "gradreg_fast.penalties.guards.COMPILED_MODEL_METHODS (named in the errors) must be the methods that train "
        "compiled models")


def _aot_supports_forward_ad() -> bool:
    """Whether this torch's aot_autograd regions have a forward-mode (jvp) rule: torch 2.13 has
    none (NotImplementedError), torch 2.14 has one. The forward-mode methods then train compiled
    models (checked below against an uncompiled twin) instead of raising."""
    import torch.autograd.forward_ad as fwAD
    torch._dynamo.reset()
    compiled = torch.compile(torch.nn.Linear(3, 2), backend="aot_eager")
    try:
        with fwAD.dual_level():
            out = compiled(fwAD.make_dual(torch.randn(4, 3), torch.randn(4, 3)))
            return fwAD.unpack_dual(out).tangent is not None
    except NotImplementedError:
        return False
    finally:
        torch._dynamo.reset()


def _params_grad(p, model):
    gs = torch.autograd.grad(p, list(model.parameters()), allow_unused=True, materialize_grads=True)
    return torch.cat([g.reshape(-1) for g in gs])


@pytest.mark.parametrize("kind,method", served_pairs(("doubleback", "frobreg")))
def test_method_on_aot_compiled_model(kind, method):
    """doubleback has one cotangent, frobreg K of them (a batched reverse pass, looped for
    compiled regions)."""
    expect = COMPILE_EXPECT[method]
    if expect == "uses forward-mode AD" and _aot_supports_forward_ad():
        expect = "trains"
    torch._dynamo.reset()
    model, x, y = make_small("tanh", batch=6, dtype=torch.float32)
    compiled = torch.compile(model, backend="aot_eager")
    if expect != "trains":
        with pytest.raises(ValueError) as info:
            gr.penalty(kind, compiled, x, y, method=method)
        msg = str(info.value)
        assert f"method={method!r}" in msg and expect in msg and "torch.compile" in msg
        for working in COMPILED_MODEL_METHODS:
            if working in gr.METHODS:
                assert f"method={working!r}" in msg
        with pytest.raises(ValueError, match=expect):
            gr.GradRegLoss(kind, lam=0.1, method=method)(compiled, x, y)
        return
    # trains: SGD steps on the compiled model equal those on an uncompiled copy
    twin, _, _ = make_small("tanh", batch=6, dtype=torch.float32)
    twin.load_state_dict(model.state_dict())
    for _ in range(3):
        for m, fwd in ((model, compiled), (twin, twin)):
            loss = gr.GradRegLoss(kind, lam=1.0, method=method,
                                  generator=torch.Generator().manual_seed(0))(fwd, x, y)
            grads = torch.autograd.grad(loss, list(m.parameters()))
            with torch.no_grad():
                for p, g in zip(m.parameters(), grads, strict=True):
                    p -= 0.1 * g
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_exact_on_eager_backend_compiled_model():
    """backend='eager' (dynamo without aot_autograd) keeps double backward: exact works and
    equals the uncompiled model."""
    torch._dynamo.reset()
    model, x, y = make_small("tanh", batch=6, dtype=torch.float64)
    compiled = torch.compile(model, backend="eager")
    p = gr.penalty("doubleback", compiled, x, y)
    ref = gr.penalty("doubleback", model, x, y)
    torch.testing.assert_close(p, ref, **TOLERANCES[torch.float64])
    torch.testing.assert_close(_params_grad(p, model), _params_grad(ref, model), **TOLERANCES[torch.float64])


def test_without_the_check_pytorch_fails_only_at_backward():
    """What the check prevents: PyTorch's own error comes at loss.backward(), not at the penalty."""
    torch._dynamo.reset()
    model, x, y = make_small("tanh", batch=6, dtype=torch.float32)
    compiled = torch.compile(model, backend="aot_eager")
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(compiled(xr), y), xr, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.pow(2).sum().backward()


def _small_relu_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("earlier_double_backward", [False, True])
@pytest.mark.parametrize("method", ["hvp", "fd"])
def test_inductor_compiled_model_trains_right_or_refuses(method, earlier_double_backward):
    """The default (inductor) backend: hvp and fd differentiate the forward graph twice, which a region
    compiled with donated buffers forbids. aot_autograd compiles so in some process states (after a
    double backward through another compiled model here: then PyTorch raised its RuntimeError, and
    with its check switched off the gradients came out 0.1 off). The library either trains, with the
    uncompiled model's gradients, or refuses with a ValueError naming what works; never a raw error."""
    if earlier_double_backward:
        other, x0, y0 = make_small("tanh", batch=6, dtype=torch.float64)
        x0.requires_grad_(True)
        (g0,) = torch.autograd.grad(torch.nn.functional.cross_entropy(torch.compile(other, backend="eager")(x0), y0),
                                    x0, create_graph=True)
        g0.pow(2).sum().backward()
    model, twin = _small_relu_net(), _small_relu_net()
    compiled = torch.compile(model)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 6, generator=g), torch.randint(3, (4,), generator=g)
    try:
        gr.GradRegLoss("doubleback", lam=1.0, method=method)(compiled, x, y).backward()
    except ValueError as exc:
        assert "donated buffers" in str(exc) and "_orig_mod" in str(exc) and "method='jvp'" in str(exc)
        return
    gr.GradRegLoss("doubleback", lam=1.0, method=method)(twin, x, y).backward()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)
