"""The command line's shared pieces: one-line errors, the device, presets and metrics.json.

Every script reports a mistake in how it was called (a missing file, a bad flag value, the Hub out of reach
without local data, a corrupt checkpoint) the same way: one line `<script>: error: <what to do>` on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

EXIT_USER_ERROR = 2  # argparse's own status for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C


class UserError(Exception):
    """A mistake in how a script was called or in what it was given: reported as one line, no traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage dump), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


@contextlib.contextmanager
def one_line_errors(prog: str, on_interrupt: str = "interrupted"):
    """Inside, a UserError ends the script with one line on stderr and exit status 2, and a Ctrl-C outside the
    training loop (which saves and reports on its own) with `on_interrupt` and exit status 130."""
    try:
        yield
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        print(f"\n{prog}: {on_interrupt}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


def pick_device(name: str) -> torch.device:
    """--device: auto is CUDA, then Apple's MPS, then the CPU; a device asked for must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple's MPS backend is not available")
    return device


def fill_preset(args: argparse.Namespace, preset: dict) -> argparse.Namespace:
    """Every flag the user did not give (still None) takes the preset's value."""
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def write_metrics(metrics: dict, path: Path | str) -> Path:
    """metrics.json (or another report), written to a temporary file and renamed: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_metrics(metrics: dict, path: Path | str | None = None) -> None:
    """A run's figures on stdout, one `name: value` line each (floats to 4 significant digits); lists and dicts
    (curves, samples, histories) are left to the caller. `path`: where they were written."""
    print("\n" + "-" * 60)
    for key, value in metrics.items():
        if not isinstance(value, (list, dict)):
            print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    if path is not None:
        print(f"\nmetrics written to {path}")
