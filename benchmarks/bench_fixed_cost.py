"""The fixed cost of a run: ``geoswc tag`` of ONE photo against ``python -c "import torch, timm"``.

Both run as fresh subprocesses of this script, alternately, ``--repeats`` times each (a shared machine's load
hits them alike); wall time comes from this process's clock, CPU time (user + system) and peak RSS from
``os.wait4``'s resource usage of that child (peak RSS: its largest process, decoding workers included). On a
loaded machine CPU time is the steadier of the two: waiting for a core counts in wall time only. A first, unmeasured tag run fills the per-machine
caches (exported graphs, the engine choice, the compact gazetteer) in a cache folder of its own, so the
figures are those of a later run on the same machine; its own time is printed as the first run's.

Printed: the machine (CPU model, the ISA flags that decide the kernels, cores), each run, and the medians:
the tag run's cost beyond the baseline in seconds and MB. Target: at most 1 s and 400 MB.

    python benchmarks/bench_fixed_cost.py --model geoswc-demo/model              # the demo's tiny model
    python benchmarks/bench_fixed_cost.py --model DIR --photo PHOTO.jpg --repeats 5
    python benchmarks/bench_fixed_cost.py --model DIR -- --no-html               # extra flags of geoswc tag

``--compare PYTHON`` times a second geoswc in the same rounds: the interpreter of another checkout's
environment (e.g. the commit before a change, installed editable in its own venv), so a before/after table
comes from one run under one load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple


def machine() -> str:
    """CPU model, its ISA flags, the CPU count and Python, in one line (`geoswc.engines.choice.machine`)."""
    from geoswc.engines.choice import machine as cpu

    box = cpu()
    return f"{box['cpu']}; ISA: {' '.join(box['isa']) or '-'}; {box['cores']} CPUs; Python {platform.python_version()}"


def run_measured(command: Sequence[str], env: dict) -> Tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MB) of ``command`` run to its end; raises if it
    fails."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4 reports this child's own resource usage (and its waited-for children's), not every child's so far.
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    error = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{error[-2000:]}")
    kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss / 1024  # bytes on macOS
    return seconds, usage.ru_utime + usage.ru_stime, kib / 1024


def synthetic_photo(folder: Path) -> Path:
    """A 640x480 camera-like JPEG (smooth gradient and noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    rgb = np.stack([x * 255 / 640, y * 255 / 480, (x + y) * 255 / 1120], axis=-1)
    rgb = np.clip(rgb + rng.normal(scale=12, size=rgb.shape), 0, 255).astype(np.uint8)
    path = folder / "photo.jpg"
    Image.fromarray(rgb).save(path, quality=90)
    return path


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder (e.g. geoswc-demo/model)")
    parser.add_argument("--photo", help="the photo to tag (default: a synthetic 640x480 JPEG)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs of each command (median)")
    parser.add_argument(
        "--compare",
        metavar="PYTHON",
        help="another environment's python whose geoswc is timed in the same rounds",
    )
    parser.add_argument("tag_args", nargs="*", help="more flags of geoswc tag (after --)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    with tempfile.TemporaryDirectory(prefix="geoswc-fixed-cost-") as scratch:
        work = Path(scratch)
        photos = work / "photos"
        photos.mkdir()
        if args.photo:
            photo = photos / Path(args.photo).name
            photo.write_bytes(Path(args.photo).read_bytes())
        else:
            photo = synthetic_photo(photos)
        env = dict(os.environ, HF_HUB_OFFLINE="1", GEOSWC_CACHE=str(work / "cache"))
        baseline = [sys.executable, "-c", "import torch, timm"]

        def tag(python: str, name: str, i: object) -> List[str]:
            out = work / f"out-{name}-{i}.csv"
            command = [python, "-m", "geoswc", "tag", str(photo), "--model", args.model, "-o", str(out)]
            return command + list(args.tag_args)

        tags = {"geoswc tag": sys.executable}
        if args.compare:
            tags = {"geoswc tag (--compare)": args.compare, **tags}
        print(f"machine: {machine()}")
        print(f"model: {args.model}; photo: {photo.name}; extra flags: {' '.join(args.tag_args) or '-'}")
        for k, (name, python) in enumerate(tags.items()):
            first_s, first_cpu, first_mb = run_measured(tag(python, f"first{k}", ""), env)
            print(
                f"{name}, first run (fills the caches): {first_s:.2f} s, CPU {first_cpu:.2f} s, {first_mb:.0f} MB"
            )
        runs: Dict[str, List[Tuple[float, float, float]]] = {"baseline": [], **{name: [] for name in tags}}
        for i in range(args.repeats):
            runs["baseline"].append(run_measured(baseline, env))
            for k, (name, python) in enumerate(tags.items()):
                runs[name].append(run_measured(tag(python, f"run{k}", i), env))
            line = "; ".join(
                f"{n} {r[-1][0]:.2f} s (CPU {r[-1][1]:.2f}) {r[-1][2]:.0f} MB" for n, r in runs.items()
            )
            print(f"round {i + 1}: {line}")
    medians = {name: [statistics.median(run[j] for run in r) for j in range(3)] for name, r in runs.items()}
    base = medians.pop("baseline")
    print(
        f"\n| medians of {args.repeats} | wall s | CPU s | peak RSS MB | beyond the baseline: wall s | CPU s | MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f'| `python -c "import torch, timm"` | {base[0]:.2f} | {base[1]:.2f} | {base[2]:.0f} | | | |')
    for name, (wall, cpu, mb) in medians.items():
        print(
            f"| {name}, one photo | {wall:.2f} | {cpu:.2f} | {mb:.0f} | **{wall - base[0]:+.2f}** "
            f"| **{cpu - base[1]:+.2f}** | **{mb - base[2]:+.0f}** |"
        )
    print("target: <= 1 s and <= 400 MB beyond the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
