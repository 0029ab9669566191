"""The lessons: every notebook runs top to bottom in a fresh kernel, and the set of lessons is what it claims.

Each notebook is executed with nbclient with MINIPEFT_FAST=1 (fewer training steps; every cell still runs and
every assert in it must hold). The other checks are about the files themselves: numbered 00, 01, ... without
gaps, each listed in lessons/README.md, committed executed in full mode (its outputs visible without running it),
and shaped as the lessons promise (a title, a Summary, exercises whose check cells run when unanswered).
"""

import json
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LESSONS = REPO / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))
NAME = re.compile(r"(\d\d)_[a-z0-9_]+\.ipynb")
EXERCISE = re.compile(r"raise NotImplementedError")  # the learner's cell: a function to write, a stub until then


def read(path):
    import nbformat

    return nbformat.read(path, as_version=4)


def test_lessons_exist_and_are_numbered_from_00_without_gaps():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers, "no lessons found in lessons/"
    assert numbers == list(range(len(numbers))), f"lesson numbers must run 00, 01, ... without gaps: {numbers}"
    assert all(NAME.fullmatch(p.name) for p in NOTEBOOKS), [p.name for p in NOTEBOOKS]


def test_readme_lists_every_lesson_and_only_existing_ones():
    readme = (LESSONS / "README.md").read_text(encoding="utf-8")
    listed = {m.group(0) for m in NAME.finditer(readme)}
    present = {p.name for p in NOTEBOOKS}
    assert present - listed == set(), f"lessons missing from lessons/README.md: {sorted(present - listed)}"
    assert listed - present == set(), f"lessons/README.md lists notebooks that do not exist: {sorted(listed - present)}"
    assert 'pip install -e ".[lessons]"' in readme and "jupyter lab lessons/" in readme


def test_every_notebook_is_a_fresh_build_of_its_source(monkeypatch):
    """lessons/NN_topic.py is the source of truth (jupytext's percent format); the committed notebook holds exactly
    its cells, in order (scripts/build_lessons.py --check)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import build_lessons

    sources = build_lessons.sources()
    assert [p.stem for p in sources] == [p.stem for p in NOTEBOOKS]  # one source per notebook, none without
    assert build_lessons.main(["--check"]) == 0
    for source in sources:  # and the check would notice a change
        nb = build_lessons.build(source)
        nb.cells[1].source += "\n# changed"
        assert build_lessons.cells(nb) != build_lessons.cells(read(source.with_suffix(".ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_executed_in_full_mode(path):
    """The committed notebook is an executed one (scripts/build_lessons.py --execute): every code cell ran, in order,
    in one full-mode run without an error, and the title says how long that run took, where and when."""
    nb = read(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{path.name}: not executed top to bottom; run python scripts/build_lessons.py --execute {path.name[:2]}"
    )
    errors = [c.id for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: cells {errors} ended in an error"
    run = nb.metadata.get("minipeft", {})
    assert run.get("mode") == "full" and run.get("seconds", 0) > 0, f"{path.name}: metadata {run}"
    assert f"*Executed in full mode on {run['machine']} in {run['seconds'] / 60:.1f} min" in nb.cells[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lesson_shape(path):
    """A title naming the lesson, fixed seeds, a Summary, and at least two exercises with check cells."""
    nb = read(path)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {path.name[:2]}"), (
        f"{path.name}: the first cell should be the title, '# {path.name[:2]} ...'"
    )
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "manual_seed" in code, f"{path.name}: no fixed seed (torch.manual_seed)"
    assert re.search(r"^#+ .*Summary", markdown, re.M), f"{path.name}: no Summary section"
    exercises = [c for c in nb.cells if c.cell_type == "code" and EXERCISE.search(c.source)]
    assert len(exercises) >= 2, f"{path.name}: {len(exercises)} exercise cells (a stub raising NotImplementedError)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lesson_runs_top_to_bottom(path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("MINIPEFT_FAST", "1")  # read by the kernel at start: fewer steps, the same cells
    # On the CPU whatever the machine has (common.DEVICE would be "cuda"): the lessons' asserts hold in float32,
    # as the notebooks were executed and as CI runs them (GPU runs train in bfloat16: lesson 08's equal base losses
    # of every method do not hold there)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    nb = read(path)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(LESSONS)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failing cell
    print(f"{path.name}: {time.perf_counter() - start:.1f}s")
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert printed.count("not answered yet") >= 2, f"{path.name}: the exercise checks should say 'not answered yet'"


def test_run_lessons_script_turns_each_notebook_into_valid_python(monkeypatch):
    """scripts/run_lessons.py (for machines without Jupyter) joins the code cells in order: valid Python holding
    every cell."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import run_lessons

    for path in NOTEBOOKS:
        script = run_lessons.as_script(path)
        compile(script, str(path), "exec")
        n_code = sum(c["cell_type"] == "code" for c in json.loads(path.read_text())["cells"])
        assert script.count("# ---- cell ") == n_code


def exercise_modules():
    return sorted((LESSONS / "exercises").glob("l[0-9][0-9].py"))


def load(path, name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", exercise_modules(), ids=[p.stem for p in exercise_modules()])
def test_solutions_pass_their_checks_and_stubs_do_not(path, monkeypatch):
    """Each lesson's exercises (lessons/exercises/lNN.py: CHECKS = {function name: check}) against the solutions
    (lessons/solutions/lNN.py): every solution passes its check, a stub is "not answered yet", and a typical
    mistake (solutions.MISTAKES = {function name: a wrong function}) fails its check."""
    monkeypatch.syspath_prepend(str(LESSONS))
    monkeypatch.setenv("MINIPEFT_FAST", "1")
    checks = load(path, f"exercises_{path.stem}")
    solutions = load(LESSONS / "solutions" / path.name, f"solutions_{path.stem}")
    assert 2 <= len(checks.CHECKS) <= 3, f"{path.name}: {len(checks.CHECKS)} exercises, want 2-3"
    for name, check in checks.CHECKS.items():
        check(getattr(solutions, name))  # raises AssertionError when the solution is wrong

        def stub(*args, **kwargs):
            raise NotImplementedError

        with pytest.raises(NotImplementedError):
            check(stub)
        with pytest.raises(AssertionError):
            check(solutions.MISTAKES[name])


def test_readme_states_each_lessons_measured_full_run(monkeypatch):
    """lessons/README.md's table of run times is the executed notebooks' own (scripts/build_lessons.py --times)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import build_lessons

    table = build_lessons.times_table()
    assert "not executed" not in table
    assert table in (LESSONS / "README.md").read_text(encoding="utf-8"), "run python scripts/build_lessons.py --times"
