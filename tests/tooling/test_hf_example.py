"""examples/hf_text_classifier.py: a tiny BERT trains with SpectReg through GradRegLoss under every method
that serves SpectReg (a few steps; needs transformers, else skipped unless GRADREG_REQUIRE_MODELS=1)."""
import importlib.util
import os

import pytest
import torch

from scripts import load_script

if importlib.util.find_spec("transformers") is None:
    if os.environ.get("GRADREG_REQUIRE_MODELS") == "1":
        raise RuntimeError("GRADREG_REQUIRE_MODELS=1 and transformers is not installed: pip install .[models]")
    pytest.skip("transformers not installed (pip install .[models])", allow_module_level=True)


def _load():
    return load_script("examples/hf_text_classifier.py", "hf_text_classifier")


def test_task_is_labelled_by_the_most_frequent_marker():
    ex = _load()
    ids, mask, y = ex.make_data(64, torch.Generator().manual_seed(1))
    for i in range(64):
        counts = [int((ids[i][mask[i] == 1] == m).sum()) for m in ex.MARKERS]
        assert counts.index(max(counts)) == int(y[i]) and sorted(counts)[-2] < max(counts)
        assert (ids[i][mask[i] == 0] == ex.PAD).all() and mask[i].sum() >= 4


def test_every_spectreg_method_trains_the_example():
    """Three steps per method, same seed: finite losses, the same first loss (the penalty's value is exact
    under every method), and every parameter, the embedding table included, moved."""
    ex = _load()
    assert set(ex.METHODS) == {"exact", "hvp", "fd"}   # jvp does not serve SpectReg (gradreg_fast._methods)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [ex.train(method, 3, batch=8) for method in ex.METHODS]
    finally:
        torch.set_num_threads(threads)
    start = ex.make_model(0)
    for r in runs:
        assert all(torch.isfinite(torch.tensor(r["losses"])))
        torch.testing.assert_close(r["losses"][0], runs[0]["losses"][0], rtol=1e-5, atol=0)
        pairs = zip(r["net"].named_parameters(), start.parameters(), strict=True)
        moved = {n for (n, a), b in pairs if not torch.equal(a, b)}
        assert "model.bert.embeddings.word_embeddings.weight" in moved
        assert len(moved) >= len(list(start.parameters())) - 2, sorted(moved)
