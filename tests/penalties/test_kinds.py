"""The table of penalty kinds (gradreg_fast/penalties/kinds.py): every row is served by every path that
should serve it, so that a kind added to the table but missed elsewhere fails here, loudly.

- gr.penalty (build_problem reads the row) against the ground truth (testing/ground_truth.py, written
  without the library's code paths), value and parameter gradients, in fp64 on a small zoo model;
- functional_penalty: the same value, or the row's refusal;
- the reference (gradreg_fast.reference) has the kind, and the ground truth knows it.
"""
import pytest
import torch

import gradreg_fast as gr
from gradreg_fast import reference
from gradreg_fast.penalties import kinds
from gradreg_fast.testing import conformance, ground_truth

TABLE = tuple(kinds.TABLE)
CLASSIFIER, DISCRIMINATOR = "smooth_mlp", "dcgan_d"


@pytest.fixture(scope="module")
def matrix():
    return conformance.Matrix(torch.float64)


def test_the_public_lists_are_the_table():
    assert gr.KINDS + gr.GAN_KINDS == TABLE
    assert set(gr.GAN_KINDS) == {n for n, s in kinds.TABLE.items() if s.gan}


def test_an_unknown_kind_names_the_kinds():
    with pytest.raises(ValueError, match="unknown penalty kind 'nope'; choose one of: doubleback"):
        kinds.lookup("nope")
    with pytest.raises(ValueError, match="unknown penalty kind"):
        gr.penalty("nope", torch.nn.Linear(3, 2), torch.randn(2, 3))
    assert kinds.lookup("FrobReg").name == "frobreg"


@pytest.mark.parametrize("kind", TABLE)
def test_every_kind_is_served_by_penalty_against_the_ground_truth(matrix, kind):
    cell = matrix.run(DISCRIMINATOR if kinds.TABLE[kind].gan else CLASSIFIER, kind, "exact")
    assert cell.status == "exact", cell


@pytest.mark.parametrize("kind", TABLE)
def test_every_kind_has_a_reference_and_a_ground_truth(kind):
    assert callable(getattr(reference, kind, None)), f"gradreg_fast.reference has no {kind!r}"
    assert kind in reference.__all__
    out = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    scalars, scale = ground_truth.targets(kind, out, y, projection=torch.randn(2, 3, 4, dtype=torch.float64),
                                          classes=y)
    assert scalars and scale > 0


@pytest.mark.parametrize("kind", TABLE)
def test_every_kind_is_served_or_refused_by_functional_penalty(matrix, kind):
    spec = kinds.TABLE[kind]
    case, _ = matrix.case(DISCRIMINATOR if spec.gan else CLASSIFIER)
    x = case.input().detach()
    y = case.y if spec.labels is not None else None
    params = dict(case.model.named_parameters())
    if spec.functional_refusal is not None:
        with pytest.raises(ValueError, match="functional_penalty"):
            gr.functional_penalty(kind, case.model, params, x, y)
        return
    opts = matrix.options(case, kind)
    value = gr.functional_penalty(kind, case.model, params, x, y, **opts)
    expected = gr.penalty(kind, case.model, x, y, **opts)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=0)
