"""The backends a benchmark measures on a device: one list for every op case and script."""
from __future__ import annotations

import torch

import gradreg_fast as gr


def compiled_backend(device: torch.device | str) -> str:
    """The compiled extension's backend for the device's type: "cuda" on a GPU, "cpp" on the CPU."""
    return "cuda" if torch.device(device).type == "cuda" else "cpp"


def kernel_backends(device: torch.device | str) -> list[str]:
    """The available kernel backends of the device's type: cpp on the CPU; cuda and triton on a GPU
    (Triton on the CPU runs in its interpreter: correct, but meaningless to time)."""
    wanted = [compiled_backend(device)] + (["triton"] if torch.device(device).type == "cuda" else [])
    status = gr.backends()
    return [b for b in wanted if status[b].available]


def op_backends(device: torch.device | str) -> list[str]:
    """"reference" (the pure-PyTorch composite, as an op backend) followed by kernel_backends."""
    return ["reference"] + kernel_backends(device)
