"""Every example in the README and in the public docstrings runs (and, in docstrings, prints what it says)."""

import doctest
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCTEST_MODULES = [
    "fusedvae.backend",
    "fusedvae.functional",
    "fusedvae.vae_loss",
    "fusedvae.nn",
    "fusedvae.reference.kl",
    "fusedvae.reference.philox",
]


@pytest.mark.parametrize("module_name", DOCTEST_MODULES)
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module_name} has no docstring example"
    assert result.failed == 0


def _readme_python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_readme_python_blocks())))
def test_readme_example_runs(index):
    import torch
    import torch._inductor.config as inductor_config

    # a block may set global torch.compile options (the README's torch.compile example does): undone after it
    with inductor_config.patch(fallback_random=inductor_config.fallback_random):
        try:
            exec(compile(_readme_python_blocks()[index], f"README.md block {index}", "exec"), {})
        finally:
            torch._dynamo.reset()
