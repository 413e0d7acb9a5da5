"""pytest setup shared by every test: which copy of the scripts to test, and the exercise report.

    pytest                          # tests the solutions at the repository root
    pytest --impl exercises         # tests a student copy made by tools/make_exercises.py
    pytest -m rmsnorm               # only the tests of one exercise
    COURSE_IMPL=exercises pytest    # the same as --impl, for IDEs

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

# name -> what the exercise is; the names match the `# EXERCISE <name>:` markers in the scripts.
EXERCISES = {
    "patch_embedding": "transformer.py: split an image into patches and project them",
    "attention": "transformer.py: scaled dot-product attention in MultiHeadSelfAttention",
    "encoder_block": "transformer.py: the pre-norm encoder block's forward",
    "rmsnorm": "llama.py: RMSNorm",
    "swiglu": "llama.py: SwiGLU in FeedForward",
    "causal_mask": "llama.py: the causal mask, offset by start_pos",
    "temperature_sampling": "llama_generation.py: sampling with temperature",
    "top_k": "llama_generation.py: filter_top_k",
    "top_p": "llama_generation.py: filter_top_p",
}


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
    config.addinivalue_line("markers", "slow: trains on real data for a while")
    config._exercise_results = defaultdict(list)


def pytest_report_header(config):
    return f"course scripts under test: {config.course_impl}"


def pytest_runtest_logreport(report):
    # Record each test's outcome under every exercise it is marked with.
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        config = _CONFIG[0]
        for name in report.keywords:
            if name in EXERCISES:
                config._exercise_results[name].append(report.outcome)


_CONFIG = []


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    _CONFIG.append(session.config)


def pytest_terminal_summary(terminalreporter, config):
    results = config._exercise_results
    if not results:
        return
    terminalreporter.section("exercises")
    for name, what in EXERCISES.items():
        outcomes = results.get(name)
        if not outcomes:
            continue
        done = all(o == "passed" for o in outcomes)
        passed = sum(o == "passed" for o in outcomes)
        status = "done" if done else "not yet"
        terminalreporter.write_line(f"{status:>8}  {name:<21} {passed}/{len(outcomes)} tests  ({what})")
