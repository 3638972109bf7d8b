"""Shared helpers for the benchmark scripts: run a CLI command, time it, evaluate, write markdown tables."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def sh(args: list[str]) -> float:
    """Run ``dmdx ARGS`` in a subprocess (as a user would); return wall-clock seconds."""
    t0 = time.perf_counter()
    print("+ dmdx " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "dmdx.cli", *args], check=True)
    return time.perf_counter() - t0


def evaluate(model: str, steps: int, n: int, out_json: Path, extra: list[str] | None = None) -> dict:
    sh(["eval", "--model", model, "--steps", str(steps), "--n", str(n), "--json", str(out_json), *(extra or [])])
    return json.loads(out_json.read_text())


def evaluate_cached(model: str, steps: int, n: int, out_json: Path) -> dict:
    """``evaluate`` for models that do not change (a teacher, a saved snapshot): reuse ``out_json`` when present."""
    return json.loads(out_json.read_text()) if out_json.is_file() else evaluate(model, steps, n, out_json)


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        if isinstance(v, list):
            return " ".join(f"{x:.2f}" for x in v)
        return "" if v is None else str(v)

    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "\n".join("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows) + "\n"
