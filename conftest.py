"""pytest setup shared by every test: which copy of the scripts to test, and the exercise report.

    pytest                          # tests the solutions at the repository root
    pytest --impl exercises         # tests a student copy made by tools/make_exercises.py
    pytest --impl=/elsewhere/copy   # a copy outside the repository: with '=' (else pytest collects the folder)
    pytest -m rmsnorm               # only the tests of one exercise
    pytest -m needs                 # the tests of whole models, which need several exercises done
    COURSE_IMPL=exercises pytest    # the same as --impl, for IDEs

A test of one exercise alone is marked with its name (`@pytest.mark.rmsnorm`); a test that needs several
(the whole model against Hugging Face's, say) is marked `@pytest.mark.needs("rmsnorm", "swiglu", ...)`, so
`-m rmsnorm` runs exactly the tests that turn green when RMSNorm is right.

Tests import the scripts by their plain names (`import llama`); the chosen folder is put first on
sys.path before any test module is imported, so `llama_generation`'s own `from llama import ...`
finds the same copy.
"""

import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def _exercise_tool():
    """tools/make_exercises.py, which holds the registry of exercises and reads the markers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_exercises", ROOT / "tools" / "make_exercises.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


TOOL = _exercise_tool()
# name -> what it is, from the registry; the names match the `# EXERCISE <name>:` markers in the scripts.
EXERCISES = {name: f"{script}: {what}" for name, (script, what) in TOOL.EXERCISES.items()}


def pytest_addoption(parser):
    parser.addoption(
        "--impl",
        default=os.environ.get("COURSE_IMPL", ""),
        help="folder holding transformer.py, llama.py and llama_generation.py to test "
        "(default: the repository root; env COURSE_IMPL)",
    )


def pytest_configure(config):
    impl = config.getoption("--impl") or str(ROOT)
    impl_dir = Path(impl).resolve()
    if not (impl_dir / "llama.py").is_file():
        raise pytest.UsageError(f"--impl {impl}: no llama.py there; make a copy with "
                                "`python tools/make_exercises.py exercises` first")
    sys.path.insert(0, str(impl_dir))
    config.course_impl = impl_dir
    for name, what in EXERCISES.items():
        config.addinivalue_line("markers", f"{name}: exercise '{name}' ({what})")
    config.addinivalue_line("markers", "needs(*names): a test of a whole model, green once all those exercises are")


def pytest_report_header(config):
    return f"course scripts under test: {config.course_impl}"


# Outcomes of this run's tests: exercise name (or "needs") -> ["passed", "failed", ...].
_RESULTS = defaultdict(list)


def pytest_runtest_logreport(report):
    # Record each test's outcome under the exercise it tests alone, or as a whole-model test.
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        for name in report.keywords:
            if name in EXERCISES:
                _RESULTS[name].append(report.outcome)
        if "needs" in report.keywords:
            _RESULTS["needs"].append(report.outcome)


def pytest_terminal_summary(terminalreporter, config):
    results = _RESULTS
    if not results:
        return
    terminalreporter.section("exercises")
    hints = exercise_hints(config.course_impl)
    for name, what in EXERCISES.items():
        outcomes = [o for o in results.get(name, []) if o != "skipped"]
        if outcomes:
            passed = outcomes.count("passed")
            status = "done" if passed == len(outcomes) else "not yet"
            terminalreporter.write_line(f"{status:>8}  {name:<21} {passed:>2}/{len(outcomes):<2} tests  ({what})")
            if status == "not yet" and name in hints:
                terminalreporter.write_line(f"{'':>10}hint: {hints[name]}")
    whole = [o for o in results.get("needs", []) if o != "skipped"]
    if whole:
        terminalreporter.write_line(f"whole-model tests (need several exercises): {whole.count('passed')}/{len(whole)} passed")


def exercise_hints(impl_dir: Path) -> dict:
    """name -> 'file:line  hint' from the `# EXERCISE name: hint` markers of the scripts under test, read with
    tools/make_exercises.py's own parser; {} if the tool or a script cannot be read."""
    try:
        hints = {}
        for script in TOOL.SCRIPTS:
            path = impl_dir / script
            try:
                shown = path.relative_to(Path.cwd())
            except ValueError:
                shown = path
            for region in TOOL.find_regions(path.read_text(), str(path)):
                hints[region["name"]] = f"{shown}:{region['start'] + 1}  {region['hint']}"
        return hints
    except Exception:  # a broken marker is the tool's to report; the summary still lists the exercises
        return {}
