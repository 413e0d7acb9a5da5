"""Make the students' copy of the course scripts: each exercise's solution replaced by a TODO.

In the scripts, an exercise is a region inside a function body:

        # EXERCISE rmsnorm: x / sqrt(mean(x^2) + eps), times weight
        ...the solution...
        # END EXERCISE

The copy keeps both marker lines and replaces the lines between them with

        raise NotImplementedError("TODO(rmsnorm): x / sqrt(mean(x^2) + eps), times weight")

so every file still imports, and everything outside the regions is byte for byte the solution.

    python tools/make_exercises.py exercises          # writes exercises/{transformer,llama,llama_generation}.py
    python tools/make_exercises.py --in-place         # turns the scripts of this folder into exercises
    pytest --impl exercises                           # grade the copy (see the README's "For students")
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("transformer.py", "llama.py", "llama_generation.py")

# The course's exercises, the one registry: the markers in the scripts must name exactly these, pytest's
# summary (conftest.py) reports on them, tests/grading.py holds the checks of each, and the README lists them.
EXERCISES = {
    "patch_embedding": ("transformer.py", "patches (after the conv stem, if any), projected to tokens"),
    "attention": ("transformer.py", "scaled dot-product attention in MultiHeadSelfAttention"),
    "encoder_block": ("transformer.py", "the pre-norm encoder block's forward"),
    "rmsnorm": ("llama.py", "RMSNorm"),
    "swiglu": ("llama.py", "SwiGLU in FeedForward"),
    "causal_mask": ("llama.py", "the causal mask, offset by start_pos"),
    "temperature_sampling": ("llama_generation.py", "sampling with temperature"),
    "top_k": ("llama_generation.py", "filter_top_k"),
    "top_p": ("llama_generation.py", "filter_top_p"),
}
PACKAGES = ("trainkit", "extras")  # what the lessons import (plumbing, sub-commands' features), copied as they are

START = re.compile(r"^(?P<indent>[ \t]*)# EXERCISE\b(?P<rest>.*)$")
NAMED = re.compile(r"^ (?P<name>[a-z][a-z0-9_]*): (?P<hint>\S.*)$")
END = re.compile(r"^(?P<indent>[ \t]*)# END EXERCISE\s*$")


class MarkerError(Exception):
    """A marker that cannot be turned into an exercise; the message names the file and line."""


def find_regions(source: str, filename: str = "<source>") -> list[dict]:
    """The exercise regions of a script: name, hint, indentation and the 0-based lines of both markers."""
    regions, open_region = [], None
    for i, line in enumerate(source.splitlines()):
        where = f"{filename}:{i + 1}"
        if start := START.match(line):
            named = NAMED.match(start["rest"])
            if not named:
                raise MarkerError(f"{where}: an exercise marker needs a name and a hint: "
                                  "'# EXERCISE <name>: <one-line hint>'")
            if open_region is not None:
                raise MarkerError(f"{where}: exercise '{named['name']}' starts inside exercise "
                                  f"'{open_region['name']}' (line {open_region['start'] + 1}); close it first")
            if any(r["name"] == named["name"] for r in regions):
                raise MarkerError(f"{where}: a second exercise named '{named['name']}'")
            open_region = {"name": named["name"], "hint": named["hint"].strip(), "indent": start["indent"],
                           "start": i}
        elif end := END.match(line):
            if open_region is None:
                raise MarkerError(f"{where}: '# END EXERCISE' without an exercise to end")
            if end["indent"] != open_region["indent"]:
                raise MarkerError(f"{where}: '# END EXERCISE' is indented differently from its "
                                  f"'# EXERCISE {open_region['name']}' (line {open_region['start'] + 1})")
            if i == open_region["start"] + 1:
                raise MarkerError(f"{where}: exercise '{open_region['name']}' is empty")
            regions.append({**open_region, "end": i})
            open_region = None
    if open_region is not None:
        raise MarkerError(f"{filename}:{open_region['start'] + 1}: exercise '{open_region['name']}' "
                          "has no '# END EXERCISE'")
    return regions


def make_exercise(source: str, filename: str = "<source>") -> tuple[str, list[str]]:
    """The student version of one script and the names of its exercises."""
    regions = find_regions(source, filename)
    lines = source.splitlines(keepends=True)
    for r in reversed(regions):
        todo = f"TODO({r['name']}): {r['hint']}"
        literal = json.dumps(todo, ensure_ascii=False)  # a double-quoted string that Python reads back as is
        lines[r["start"] + 1:r["end"]] = [f"{r['indent']}raise NotImplementedError({literal})\n"]
    return "".join(lines), [r["name"] for r in regions]


def solution_region(source: str, name: str) -> str:
    """The solution lines of one exercise (between its markers), for putting back into a student copy."""
    for r in find_regions(source):
        if r["name"] == name:
            return "".join(source.splitlines(keepends=True)[r["start"] + 1:r["end"]])
    raise KeyError(name)


def check_registry(script: str, names: list[str]) -> None:
    """The exercises marked in `script` must be the ones EXERCISES lists for it, in any order."""
    expected = {name for name, (where, _) in EXERCISES.items() if where == script}
    if set(names) != expected:
        extra, missing = sorted(set(names) - expected), sorted(expected - set(names))
        raise MarkerError(f"{script}: the markers and tools/make_exercises.py's EXERCISES differ"
                          + (f"; not registered: {', '.join(extra)}" if extra else "")
                          + (f"; no marker for: {', '.join(missing)}" if missing else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write the students' TODO copy of the course scripts.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("out_dir", nargs="?", help="folder to write the copy into (created if missing)")
    where.add_argument("--in-place", action="store_true", help="rewrite the scripts themselves")
    p.add_argument("--source", default=str(ROOT), help="folder holding the solution scripts")
    args = p.parse_args(argv)

    source_dir = Path(args.source)
    out_dir = source_dir if args.in_place else Path(args.out_dir)
    try:
        made = {}
        for script in SCRIPTS:  # check every script before writing any
            path = source_dir / script
            if not path.is_file():
                raise MarkerError(f"{path}: not found; --source must be the folder with {', '.join(SCRIPTS)}")
            made[script] = make_exercise(path.read_text(), str(path))
            check_registry(script, made[script][1])
    except MarkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    for script, (text, names) in made.items():
        (out_dir / script).write_text(text)
        print(f"{out_dir / script}: {len(names)} exercises ({', '.join(names)})")
    if not args.in_place:
        for package in PACKAGES:
            if (source_dir / package).is_dir():
                shutil.copytree(source_dir / package, out_dir / package, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
    print(f"next: edit the TODOs, then `pytest --impl {out_dir}` (or `-m NAME` for one exercise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
