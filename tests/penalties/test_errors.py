"""Bad input: each raises a TypeError/ValueError that names the problem."""
import pytest
import torch
from torch import nn

import gradreg_fast as gr
from gradreg_fast.testing.zoo import make_small as make


@pytest.fixture
def setup():
    return make("mlp", seed=0)


def test_integer_and_boolean_x(setup):
    model, x, y = setup
    with pytest.raises(TypeError, match="floating"):
        gr.penalty("doubleback", model, x.long(), y)
    with pytest.raises(TypeError, match="floating"):
        gr.penalty("spectreg", model, x > 0)


def test_x_without_batch_dimension(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="batch dimension"):
        gr.penalty("frobreg", model, x[0])


def test_y_wrong_length(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="one entry per sample"):
        gr.penalty("doubleback", model, x, y[:-1])
    with pytest.raises(ValueError, match="one entry per sample"):
        gr.GradRegLoss("onehot", 1.0)(model, x, y[:-1])


def test_y_not_integer_or_out_of_range(setup):
    model, x, y = setup
    with pytest.raises(TypeError, match="integer class indices"):
        gr.penalty("onehot", model, x, y.double())
    with pytest.raises(ValueError, match="outside"):
        gr.penalty("onehot", model, x, y + 10)


def test_base_loss_labels_allow_ignore_index_only(setup):
    """GradRegLoss's default base loss takes F.cross_entropy's ignore_index -100 among the labels; any
    other label outside [0, K) raises, named, also next to -100 (the range check's slow path)."""
    model, x, y = setup
    k = model(x).shape[1]
    crit = gr.GradRegLoss("frobreg", 0.1)
    ignored = y.clone()
    ignored[0] = -100
    assert torch.isfinite(crit(model, x, ignored))
    for bad in (k, -1):
        labels = ignored.clone()
        labels[1] = bad
        with pytest.raises(ValueError, match=f"class index {bad} outside \\[0, {k}\\)"):
            crit(model, x, labels)


@pytest.mark.parametrize("lam", [-1.0, float("nan"), float("inf")])
def test_bad_lambda(lam):
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        gr.GradRegLoss("spectreg", lam)


def test_unknown_kind_lists_kinds(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="doubleback, spectreg, frobreg, jacreg, onehot, random_onehot"):
        gr.penalty("gradnorm", model, x, y)
    with pytest.raises(ValueError, match="choose one of"):
        gr.GradRegLoss("gradnorm", 1.0)


def test_unknown_method(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="unknown method 'magic'.*exact"):
        gr.penalty("spectreg", model, x, method="magic")


def test_logits_not_b_by_k_for_classifier_penalty():
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3))).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"must be \(B, K\)"):
        gr.penalty("jacreg", model, x)
    # spectreg/frobreg are defined for any (B, ...) output: flattened
    assert torch.isfinite(gr.penalty("frobreg", model, x))


def test_onehot_without_y(setup):
    model, x, _ = setup
    with pytest.raises(ValueError, match="needs the labels y"):
        gr.penalty("onehot", model, x)
    with pytest.raises(ValueError, match="needs the labels y"):
        gr.penalty("doubleback", model, x)


def test_projection_wrong_shape(setup):
    model, x, _ = setup
    with pytest.raises(ValueError, match="projection has shape"):
        gr.penalty("spectreg", model, x, projection=torch.randn(4, dtype=x.dtype))
    with pytest.raises(ValueError, match="projection applies to 'spectreg' only"):
        gr.penalty("frobreg", model, x, projection=torch.randn(5, dtype=x.dtype))


def test_model_output_independent_of_x(setup):
    _, x, y = setup
    bias = nn.Parameter(torch.randn(5, dtype=x.dtype))
    constant = lambda inp: bias.expand(inp.shape[0], 5)  # noqa: E731
    with pytest.raises(ValueError, match="does not depend on x"):
        gr.penalty("spectreg", constant, x)
    no_grad_at_all = lambda inp: torch.zeros(inp.shape[0], 5, dtype=inp.dtype)  # noqa: E731
    with pytest.raises(ValueError, match="does not depend on x"):
        gr.penalty("frobreg", no_grad_at_all, x)


def test_per_sample_loss_required(setup):
    model, x, y = setup
    mean_loss = lambda out, t: nn.functional.cross_entropy(out, t)  # noqa: E731
    with pytest.raises(ValueError, match="per-sample losses"):
        gr.penalty("doubleback", model, x, y, loss_fn=mean_loss)


def test_logits_form_requires_grad_input(setup):
    model, x, y = setup
    crit = gr.GradRegLoss("spectreg", 1.0)
    with pytest.raises(ValueError, match="requires_grad_"):
        crit(model(x), y, inputs=x)


def test_bad_n_proj_and_unknown_option(setup):
    model, x, _ = setup
    with pytest.raises(ValueError, match="n_proj"):
        gr.penalty("spectreg", model, x, n_proj=0)
    with pytest.raises(TypeError, match="unknown options"):
        gr.GradRegLoss("spectreg", 1.0, nproj=3)
