"""Shared helpers for the benchmark scripts: machine description, load, timing, RESULTS.md sections.

Not part of the library; imported by ``benchmarks/bench_*.py`` run as plain scripts.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"
SHARED_DATA = REPO.parent / "shared" / "data"

HEADER = """# item-embed benchmarks: results

The current numbers of each benchmark. What was tried to get here, and what each idea measured, is in
[docs/ablations.md](../docs/ablations.md); the recipe itself is described in [docs/recipe.md](../docs/recipe.md).

Every number comes from **one run of the named script on one machine** (command, time, CPU and load in
each section). Ratios measured side by side in one run are more trustworthy than absolute numbers, which
move with other users' load on this shared 2-core machine. Re-run with `bash benchmarks/run_all.sh` (or one
script; `--quick` numbers are not meant to be quoted).

"""


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def machine(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What the numbers were measured on (torch imported lazily: not every script needs it)."""
    info = {
        "cpu": lscpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{mem_total_gib():.0f} GiB",
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch threads"] = str(torch.get_num_threads())
    except ImportError:
        pass
    info.update(extra or {})
    return info


def wait_for_quiet(threshold: float = 1.5, max_wait: float = 0.0, poll: float = 15.0) -> tuple[float, bool]:
    """Wait up to ``max_wait`` s for the 1-minute load average to drop below ``threshold``.

    Returns (1-minute load when starting, whether it was quiet).
    """
    t0 = time.time()
    while True:
        load1 = loadavg()[0]
        if load1 < threshold:
            return load1, True
        if time.time() - t0 >= max_wait:
            return load1, False
        print(f"  load average {load1:.2f} >= {threshold}: waiting ({time.time() - t0:.0f}/{max_wait:.0f}s)",
              flush=True)
        time.sleep(poll)


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process: all its threads, user + system)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    v = [int(x) for x in fields[:8]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime, stime (fields 14 and 15)


class Interference:
    """Measures how many cores OTHER processes used while a block ran (this process excluded).

    ``with Interference() as it: ...`` then ``it.cores`` (mean cores used by others) and
    ``it.seconds``. Child processes of this one count as "others": use it around in-process work.
    """

    def __enter__(self) -> "Interference":
        self._t0 = time.perf_counter()
        self._busy0, self._own0 = _cpu_ticks()
        return self

    def __exit__(self, *exc) -> None:
        busy, own = _cpu_ticks()
        self.seconds = time.perf_counter() - self._t0
        others = max(0, (busy - self._busy0) - (own - self._own0)) / _TICK
        self.cores = others / max(self.seconds, 1e-9)


CLEAN_CORES = 0.15  # other processes using more CPU than this during a measurement make it "noisy"


class IdleBudget:
    """Waits, out of a total budget of seconds, for other processes to leave the CPU alone."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds
        self.waited = 0.0

    def wait(self, window: float = 3.0, need: int = 2) -> bool:
        """Block until ``need`` consecutive ``window``-second windows saw others use < CLEAN_CORES cores
        (this process is idle meanwhile) or the budget is spent. Returns whether it got quiet."""
        streak = 0
        while self.left > 0:
            with Interference() as it:
                time.sleep(window)
            self.left -= it.seconds
            self.waited += it.seconds
            streak = streak + 1 if it.cores < CLEAN_CORES else 0
            if streak >= need:
                return True
        return False


def measure_clean(fn, tries: int = 3, budget: IdleBudget | None = None) -> tuple[float, float, int]:
    """Wall seconds of ``fn()``, re-run (up to ``tries`` times) while other processes used more than
    CLEAN_CORES cores during it. Returns (seconds of the cleanest run, others' cores then, runs made)."""
    best = None
    for i in range(tries):
        with Interference() as it:
            fn()
        if best is None or it.cores < best[1]:
            best = (it.seconds, it.cores)
        if it.cores <= CLEAN_CORES:
            return it.seconds, it.cores, i + 1
        if budget is not None:
            budget.wait()
    return best[0], best[1], tries


def command_line() -> str:
    """The command that ran this script, as one would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def text_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def run_context(load_start: tuple[float, float, float], load_end: tuple[float, float, float],
                quiet: bool, seconds: float) -> str:
    """One paragraph: machine, command, when, load."""
    m = machine()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    desc = ", ".join(f"{k} {v}" for k, v in m.items() if k != "cpu")
    state = ("quiet (1-min load below 1.5 at the start)" if quiet else
             "**NOT quiet**: other users' jobs were running (1-min load >= 1.5 at the start); "
             "absolute numbers are pessimistic, side-by-side ratios less affected")
    return (f"- Command: `{command_line()}` ({seconds:.0f} s wall)\n"
            f"- Machine: {m['cpu']} ({desc})\n"
            f"- When: {when}; load average (1/5/15 min) at start {_fmt_load(load_start)}, "
            f"at end {_fmt_load(load_end)}: {state}")


def _fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def add_embed_options(ap) -> None:
    """The options of the benchmarks that embed a catalog with a trained model (bench_ray_embed, bench_remote)."""
    ap.add_argument("--products", type=int, default=2000)
    ap.add_argument("--model", help="a trained run folder (default: train --preset minilm for 20 steps)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="400 products, tiny model, one repeat")


def leave_results(args) -> bool:
    """Whether this run leaves RESULTS.md alone (``--quick`` or ``--no-results``), saying so."""
    if args.no_results or getattr(args, "quick", False):
        print("RESULTS.md left alone (--quick or --no-results)")
        return True
    return False


def update_results(name: str, title: str, body: str) -> Path:
    """Replace (or append) the section ``name`` of RESULTS.md, keeping the other sections."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    section = f"{begin}\n## {title}\n\n{body.strip()}\n{end}\n"
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
    return RESULTS


def max_rss_mib_self() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_rate(dtype: "torch.dtype", seconds: float, device: str = "cpu", n: int = 2048) -> float:
    """FLOP/s of back-to-back n x n @ n x n products (best of several timed blocks).

    CPU: n = 2048. CUDA: pass a large n (8192) to reach the GPU's peak; blocks of 10 products,
    ``torch.cuda.synchronize()`` before each timer read."""
    import torch

    if device == "cpu":
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        for _ in range(3):
            torch.mm(a, b, out=out)
        best, t_end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            reps, t0 = 4, time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=out)
            best = max(best, reps * 2 * n**3 / (time.perf_counter() - t0))
        return best
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    for _ in range(5):
        torch.mm(a, b, out=out)
    torch.cuda.synchronize(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        reps, t0 = 10, time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        torch.cuda.synchronize(device)
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - t0))
    del a, b, out
    return best
