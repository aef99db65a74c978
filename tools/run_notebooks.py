"""Execute notebooks in place so their stored outputs are what CI's `pytest --nbval` compares against.

    .venv/bin/python tools/run_notebooks.py notebooks/01_noise_schedules.ipynb [...]

Run it after editing a notebook. It uses the same kernel environment as the tests (offline, fixed threads).
"""
from __future__ import annotations

import os
import sys
import time

import nbformat
from nbclient import NotebookClient


def run(path: str, timeout: int = 600) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}).execute()
    nbformat.write(nb, path)
    return time.perf_counter() - start


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for p in sys.argv[1:]:
        print(f"{p}: {run(p):.1f} s")
