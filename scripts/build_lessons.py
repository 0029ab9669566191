"""Build the lesson notebooks from their sources: lessons/NN_topic.py (jupytext's percent format) -> NN_topic.ipynb.

    python scripts/build_lessons.py                  # every notebook, cells from its source, no outputs
    python scripts/build_lessons.py 02 07            # only these lessons
    python scripts/build_lessons.py --execute 02     # and run it top to bottom (full mode), keeping its outputs
    python scripts/build_lessons.py --check          # exit 1 if a committed notebook's cells differ from its source
    python scripts/build_lessons.py --text 02        # prose edits only: the executed notebook's text cells updated
    python scripts/build_lessons.py --times          # the table of full-run times for lessons/README.md

The committed notebooks are the executed ones (`--execute`), so that their numbers and plots show on GitHub
without running anything; the run's time, date and machine are written under the title (EXECUTED below) and into
the notebook's metadata. A build without --execute (while editing) writes the cells alone.

The .py file is the lesson's source of truth: it diffs and lints like code (`ruff check lessons/`), runs as a
plain script (`cd lessons && python 02_lora.py`), and opens in Jupyter with jupytext. The notebook is built from
it: the same cells in the same order, with stable ids (`02-000`, `02-001`, ...), so a rebuild changes only what
changed. tests/test_lessons.py checks that every committed notebook equals a fresh build of its source.
"""

import argparse
import os
import sys
import time
from pathlib import Path

LESSONS = Path(__file__).resolve().parents[1] / "lessons"


def sources(numbers=()):
    found = sorted(LESSONS.glob("[0-9][0-9]_*.py"))
    return [p for p in found if not numbers or p.name[:2] in numbers]


def build(source):
    """The notebook of one source file, without outputs."""
    import jupytext
    import nbformat

    nb = jupytext.read(source)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, cell in enumerate(nb.cells):
        cell.id = f"{source.name[:2]}-{i:03d}"
        cell.metadata = {}
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.validate(nb)
    return nb


EXECUTED = "\n\n*Executed in full mode"  # the line --execute adds to the title cell (not part of the source)


def cells(nb):  # what a build decides: each cell's kind and source (the title without the executed line)
    return [(c.cell_type, c.source.split(EXECUTED)[0] if i == 0 else c.source) for i, c in enumerate(nb.cells)]


def machine():
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"a {os.cpu_count()}-core CPU ({platform.machine()})"


def mark_executed(nb, seconds, load):
    """Say under the title how long the full run took, where and when; keep the same in the metadata."""
    when = time.strftime("%Y-%m-%d")
    nb.metadata["minipeft"] = dict(mode="full", seconds=round(seconds, 1), machine=machine(), date=when,
                                   load_average_at_start=round(load, 2),
                                   omp_num_threads=os.environ.get("OMP_NUM_THREADS"))  # fmt: skip
    nb.cells[0].source += f"{EXECUTED} on {machine()} in {seconds / 60:.1f} min ({when}).*"


def execute(nb, timeout=3600):
    """Run the notebook in a fresh kernel from lessons/, in full mode (MINIPEFT_FAST unset); -> seconds."""
    from nbclient import NotebookClient

    env_fast = os.environ.pop("MINIPEFT_FAST", None)
    try:
        start = time.perf_counter()
        NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(LESSONS)}}
        ).execute()
        return time.perf_counter() - start
    finally:
        if env_fast is not None:
            os.environ["MINIPEFT_FAST"] = env_fast


def refresh_text(nb, target):
    """The executed notebook at `target` with the text cells of a fresh build `nb` (its code and outputs kept, its
    executed line kept); an error if a code cell changed, since that needs a new run (--execute)."""
    import nbformat

    old = nbformat.read(target, as_version=4)
    code = [(c.cell_type, c.source) for c in nb.cells if c.cell_type == "code"]
    if code != [(c.cell_type, c.source) for c in old.cells if c.cell_type == "code"] or len(nb.cells) != len(old.cells):
        raise SystemExit(f"{target.name}: code cells changed since it ran; rebuild it with --execute")
    for i, (new, cell) in enumerate(zip(nb.cells, old.cells, strict=True)):
        if new.cell_type != cell.cell_type:
            raise SystemExit(f"{target.name}: cell {i} changed kind; rebuild it with --execute")
        if cell.cell_type == "markdown":
            executed = cell.source[len(cell.source.split(EXECUTED)[0]) :] if i == 0 else ""
            cell.source = new.source + executed
    return old


def times_table():
    """lessons/README.md's table of full runs, from the executed notebooks' metadata."""
    import nbformat

    rows = ["| lesson | full run | on | load average at its start | date |", "| --- | ---: | --- | ---: | --- |"]
    for source in sources():
        run = nbformat.read(source.with_suffix(".ipynb"), as_version=4).metadata.get("minipeft", {})
        if run:
            threads = f", {run['omp_num_threads']} thread" if run.get("omp_num_threads") == "1" else ""
            rows.append(f"| {source.stem} | {run['seconds'] / 60:.1f} min | {run['machine']}{threads} | "
                        f"{run['load_average_at_start']:.1f} | {run['date']} |")  # fmt: skip
        else:
            rows.append(f"| {source.stem} | not executed | | | |")
    return "\n".join(rows)


def main(argv=None):
    import nbformat

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("numbers", nargs="*", help="lesson numbers (default: all)")
    ap.add_argument("--execute", action="store_true", help="run each notebook and keep its outputs")
    ap.add_argument("--check", action="store_true", help="only compare the committed notebooks with their sources")
    ap.add_argument("--text", action="store_true", help="update an executed notebook's text cells only")
    ap.add_argument("--times", action="store_true", help="print lessons/README.md's table of full-run times")
    args = ap.parse_args(argv)
    if args.times:
        print(times_table())
        return 0
    stale = []
    for source in sources(args.numbers):
        target = source.with_suffix(".ipynb")
        nb = build(source)
        if args.check:
            if not target.is_file() or cells(nbformat.read(target, as_version=4)) != cells(nb):
                stale.append(target.name)
            continue
        if args.text:
            nbformat.write(refresh_text(nb, target), target)
            print(f"updated the text of {target.relative_to(LESSONS.parent)}")
            continue
        load = os.getloadavg()[0]  # other work on the machine slows the run: recorded with its time
        seconds = execute(nb) if args.execute else None
        if seconds is not None:
            mark_executed(nb, seconds, load)
        nbformat.write(nb, target)
        print(f"wrote {target.relative_to(LESSONS.parent)} ({len(nb.cells)} cells"
              f"{f', executed in {seconds:.0f} s' if seconds is not None else ''})")  # fmt: skip
    if stale:
        print(f"built from older sources (run python scripts/build_lessons.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
