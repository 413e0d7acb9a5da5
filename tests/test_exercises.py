"""Exercise mode: tools/make_exercises.py makes the students' copy, and the test suite grades it.

The round trip runs pytest on a fresh copy in a subprocess: every exercise fails with its own TODO
message; putting two solutions back turns exactly those two exercises green; and every test that carries no
exercise's mark passes on the fresh copy.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import make_exercises as mk  # noqa: E402


EXERCISES = mk.EXERCISES  # the registry: the names the markers and the exercise summary use

pytestmark = pytest.mark.skipif(not all((ROOT / s).is_file() for s in mk.SCRIPTS), reason="needs the solutions")


def test_markers_that_differ_from_the_registry_are_refused():
    mk.check_registry("llama.py", ["rmsnorm", "swiglu", "causal_mask"])  # the registered three, any order
    with pytest.raises(mk.MarkerError, match="no marker for: swiglu"):
        mk.check_registry("llama.py", ["causal_mask", "rmsnorm"])
    with pytest.raises(mk.MarkerError, match="not registered: layer_norm"):
        mk.check_registry("transformer.py", ["patch_embedding", "attention", "encoder_block", "layer_norm"])


@pytest.fixture(scope="module")
def student_copy(tmp_path_factory):
    out = tmp_path_factory.mktemp("exercises")
    assert mk.main([str(out), "--source", str(ROOT)]) == 0
    return out


def test_every_marked_region_becomes_one_todo_and_nothing_else_changes(student_copy):
    names = []
    for script in mk.SCRIPTS:
        solution = (ROOT / script).read_text()
        copy = (student_copy / script).read_text()
        regions = mk.find_regions(solution, script)
        names += [r["name"] for r in regions]
        todos = re.findall(r'raise NotImplementedError\("TODO\((\w+)\): ', copy)
        assert todos == [r["name"] for r in regions]
        # Putting each solution back between its markers gives the original file, byte for byte.
        restored = copy
        for r in regions:
            restored = restored.replace(
                next(line for line in copy.splitlines(keepends=True) if f'"TODO({r["name"]})' in line),
                mk.solution_region(solution, r["name"]), 1)
        assert restored == solution
    assert sorted(names) == sorted(EXERCISES), "the scripts' exercises and the registry differ"


def test_the_student_copy_imports(student_copy):
    result = subprocess.run([sys.executable, "-c", "import transformer, llama, llama_generation"],
                            cwd=student_copy, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("source, message", [
    ("def f():\n    # EXERCISE a: hint\n    return 1\n", "f.py:2: exercise 'a' has no '# END EXERCISE'"),
    ("def f():\n    return 1\n    # END EXERCISE\n", "f.py:3: '# END EXERCISE' without an exercise"),
    ("def f():\n    # EXERCISE\n    return 1\n    # END EXERCISE\n", "f.py:2: an exercise marker needs a name"),
    ("def f():\n    # EXERCISE a\n    return 1\n    # END EXERCISE\n", "f.py:2: an exercise marker needs a name"),
    ("def f():\n    # EXERCISE a: x\n    # EXERCISE b: y\n    return 1\n    # END EXERCISE\n    # END EXERCISE\n",
     "f.py:3: exercise 'b' starts inside exercise 'a'"),
    ("def f():\n    # EXERCISE a: x\n    return 1\n  # END EXERCISE\n", "f.py:4: '# END EXERCISE' is indented"),
    ("def f():\n    # EXERCISE a: x\n    # END EXERCISE\n", "f.py:3: exercise 'a' is empty"),
    ("def f():\n    # EXERCISE a: x\n    y = 1\n    # END EXERCISE\n"
     "def g():\n    # EXERCISE a: x\n    y = 2\n    # END EXERCISE\n", "f.py:6: a second exercise named 'a'"),
])
def test_bad_markers_are_refused_naming_the_line(source, message):
    with pytest.raises(mk.MarkerError) as e:
        mk.make_exercise(source, "f.py")
    assert str(e.value).startswith(message)


def test_the_tool_refuses_bad_markers_without_writing_anything(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for script in mk.SCRIPTS:
        (src / script).write_text((ROOT / script).read_text())
    (src / "llama.py").write_text((ROOT / "llama.py").read_text().replace("# END EXERCISE", "# END", 1))
    assert mk.main([str(out), "--source", str(src)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "llama.py:" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def run_exercise_tests(impl: Path) -> tuple[dict, str]:
    """pytest on a copy, only the tests of single exercises; returns ({name: 'done'/'not yet'}, output)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--impl", str(impl), "-m", " or ".join(EXERCISES),
                             "-q", "-rf", "-p", "no:cacheprovider", "tests"],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "1000"})
    status = dict((m[2], m[1]) for m in re.finditer(r"^\s*(done|not yet)\s+(\w+)\s", result.stdout, re.M))
    return {name: status.get(name) for name in EXERCISES}, result.stdout


def test_round_trip_every_exercise_fails_with_its_todo_and_turns_green_when_solved(tmp_path):
    assert mk.main([str(tmp_path), "--source", str(ROOT)]) == 0
    status, out = run_exercise_tests(tmp_path)
    assert set(status.values()) == {"not yet"}, out
    failures = [line for line in out.splitlines() if line.startswith("FAILED")]
    for name in EXERCISES:
        assert any(f"TODO({name})" in line for line in failures), f"no test of {name} fails with its TODO"
    assert all("NotImplementedError: TODO(" in line for line in failures), "a failure that is not a TODO"

    # The student solves RMSNorm (Day 2) and attention (Day 1): exactly those two turn green.
    for script, name in (("llama.py", "rmsnorm"), ("transformer.py", "attention")):
        copy = (tmp_path / script).read_text()
        todo = next(line for line in copy.splitlines(keepends=True) if f'"TODO({name})' in line)
        (tmp_path / script).write_text(copy.replace(todo, mk.solution_region((ROOT / script).read_text(), name)))
    status, out = run_exercise_tests(tmp_path)
    assert status == {name: "done" if name in ("rmsnorm", "attention") else "not yet" for name in EXERCISES}, out


def test_on_a_fresh_copy_every_test_outside_the_exercises_passes(student_copy):
    # A test that needs an exercise done must say so (its exercise's mark, or `needs`); otherwise a student
    # with nothing filled in yet sees a failure that no exercise explains. The copy's own round trip
    # (this file) is left out: it would start itself again.
    not_exercises = " and ".join(f"not {name}" for name in (*EXERCISES, "needs"))
    result = subprocess.run([sys.executable, "-m", "pytest", "--impl", str(student_copy), "-m", not_exercises,
                             "-q", "-rf", "-p", "no:cacheprovider", "--ignore", "tests/test_exercises.py", "tests"],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "1000"})
    failures = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    assert result.returncode == 0, "unmarked tests fail on a fresh copy:\n" + "\n".join(failures or [result.stdout])
