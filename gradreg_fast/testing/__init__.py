"""Test support shipped with the package, so that the tests, the benchmarks and users' own checks share it.

- ``zoo``: small models of the layer types people train (LeNet, ResNet with BatchNorm, a ViT with
  LayerNorm and attention, GroupNorm, LSTM, embeddings, parametrizations, ...), each with inputs.
- ``ground_truth``: penalties and their parameter gradients by plain double backpropagation, written
  with torch alone (no gradreg_fast code path), the reference every estimator is checked against.
- ``conformance``: runs one (model, kind, method) cell against the ground truth and classifies it.
- ``torchrun``: ``exit_worker()``, the end of a torchrun worker process (gloo's teardown on torch 2.14.1).
"""
