"""The benchmarks' shared harness, imported by the scripts in benchmarks/ (which put this folder's
parent first on sys.path):

    timing     probe(): the first call of each variant, failures set aside; time_interleaved(): median
               seconds per call, repetitions interleaved across the variants (CUDA events on a GPU)
    memory     peak memory of one call: CUDA allocator growth, or live tensor storage on the CPU
    results    the result files (json, csv, txt, png) and their metadata (command line, UTC time)
    backends   the compiled backends that run on a device, with or without the reference composite
    models     the step benchmark's models by name (LeNet is gradreg_fast.testing.zoo's, as in the tests)
    progress   a tqdm progress bar, or a silent stand-in without tqdm

Importing it makes ``import gradreg_fast`` work: the installed package (with its built extension),
else the source tree this folder belongs to.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import gradreg_fast  # noqa: F401  (the installed package, with its built extension)
except ImportError:  # a source checkout with the extension built in place
    sys.path.insert(0, ROOT)
