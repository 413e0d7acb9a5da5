"""Where a benchmark ran: the machine header every benchmark prints and writes into its --json file.

    from machine import describe_machine, print_header, write_json
    machine = describe_machine()          # CPU model, cores, threads, torch, GPU, measured matmul peaks
    print_header(machine)
    write_json(path, machine, results)    # {"machine": {...}, "results": {...}}

The matmul peaks are measured here, on this machine, not looked up: fp32, and fp32 inputs under bf16 autocast
(what the training scripts run), as a dense n x n x n product, best of a few. They are the ceiling the models'
matrix products could reach, and say at a glance whether bf16 pays on this machine.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo's "model name" on Linux, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def matmul_peak(device: torch.device, bf16_autocast: bool, n: int | None = None) -> float:
    """FLOP/s of a dense n x n x n float32 matmul, plain or under bf16 autocast: the best of repeated timings
    (trainkit.precision.matmul_speed, the same timer --precision auto uses)."""
    from trainkit.precision import matmul_speed  # the benchmarks put the repository root on sys.path first

    n = n or (2048 if device.type == "cpu" else 8192)
    return matmul_speed(torch.bfloat16 if bf16_autocast else None, (n, n, n), device, seconds=0.5)


def describe_machine(device: str | torch.device = "cpu") -> dict:
    """Everything needed to tell two benchmark runs' machines apart, with this device's matmul peaks."""
    device = torch.device(device)
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device if device.type == "cuda" else 0) if torch.cuda.is_available() else None,
        "device": str(device),
    }
    info["fp32_matmul_gflops"] = matmul_peak(device, bf16_autocast=False) / 1e9
    info["bf16_autocast_matmul_gflops"] = matmul_peak(device, bf16_autocast=True) / 1e9
    return info


def print_header(info: dict) -> None:
    gpu = f"; GPU {info['gpu']}" if info["gpu"] else ""
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads{gpu}; "
          f"torch {info['torch']}; measured on {info['device']}")
    print(f"matmul peak: fp32 {info['fp32_matmul_gflops']:.0f} GFLOP/s, bf16 autocast "
          f"{info['bf16_autocast_matmul_gflops']:.0f} GFLOP/s "
          f"({info['bf16_autocast_matmul_gflops'] / info['fp32_matmul_gflops']:.2f}x fp32)")


def write_json(path: str | None, info: dict, results: dict) -> None:
    """{"machine": info, "results": results} at path (nothing when path is None), written atomically."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"figures written to {path}")
