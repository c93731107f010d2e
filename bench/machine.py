"""The machine a benchmark ran on, printed at the top of every benchmark's output."""
from __future__ import annotations

import importlib.metadata
import os
import platform


def machine_info(*packages: str) -> dict:
    "CPU model, cores, memory, OS, Python, the load average now, and the versions of `packages`."
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}
    for p in packages:
        try: info[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError: info[p] = None
    return info


def machine(*packages: str) -> str:
    "One line: CPU model, cores, memory, OS, Python, load average (other work skews figures) and package versions."
    i = machine_info(*packages)
    line = (f"machine: {i['cpu']}, {i['cores']} cores, {i['memory_gib']:.0f} GiB, {i['os']}, Python {i['python']}, "
            f"load average {', '.join(f'{x:.1f}' for x in i['load_avg'])}")
    return line + "".join(f", {p} {i[p]}" for p in packages)
