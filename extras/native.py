"""C sources of extras/ built with the machine's C compiler into libraries loaded with ctypes.

Each build is made once per process, at first use, into a temporary file (under a second), with -march=native,
so it is never shared between machines. What calls a library checks it against PyTorch before using it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

# The first build that succeeds is used: native vector instructions and OpenMP threads, then without either.
BUILDS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])


def compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(source: Path, builds: tuple = BUILDS) -> tuple[Optional[ctypes.CDLL], str]:
    """The library built from `source` with the first of `builds` (lists of compiler flags) that succeeds, and how
    it was built ("gcc -O3 ..."); or None and why there is none."""
    cc = compiler()
    if cc is None:
        return None, "no C compiler found (set CC to one)"
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, flags in enumerate(builds):
            so = str(Path(tmp) / f"{source.stem}{i}.so")
            try:
                built = subprocess.run([cc, *flags, "-shared", "-fPIC", str(source), "-o", so, "-lm"],
                                       capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as e:
                return None, f"could not run the C compiler {cc}: {e}"
            if built.returncode == 0:
                return ctypes.CDLL(so), f"{Path(cc).name} {' '.join(flags)}"  # loaded: the file may go
            errors.append((built.stderr.strip().splitlines() or ["failed"])[-1])
    return None, f"{cc} could not build {source.name}: {errors[0][:200]}"


def verified(built: tuple[Optional[ctypes.CDLL], str], wrong: Callable[[], Optional[str]]) -> tuple[bool, str]:
    """(True, how it was built) where `built` (build's answer) holds a library and wrong() finds nothing amiss with
    it; else (False, why not). wrong: None, or what differs from PyTorch ("its products differ from PyTorch's")."""
    lib, how = built
    if lib is None:
        return False, how
    problem = wrong()
    return (False, f"built ({how}) but {problem}; not used") if problem else (True, how)
