"""Load a script of the repository (an example or a benchmark) as a module, without running its main."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(relpath: str, name: str):
    """The file ROOT/relpath as module ``name``, registered in sys.modules (dataclasses look their module
    up there while the file executes)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
