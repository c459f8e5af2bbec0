"""A tqdm progress bar when tqdm is installed, else a stand-in that shows nothing (and prints what
a bar would have written above itself)."""
from __future__ import annotations


class _NoBar:
    def update(self, n=1):
        pass

    def reset(self, total=None):
        pass

    def set_description(self, desc=None):
        pass

    def close(self):
        pass

    def write(self, msg):
        print(msg, flush=True)


def progress_bar(enabled: bool = True, **tqdm_kwargs):
    """``tqdm(**tqdm_kwargs)``, or a silent stand-in when ``enabled`` is false or tqdm is missing."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:  # the progress bar is optional
            pass
        else:
            return tqdm(**tqdm_kwargs)
    return _NoBar()
