"""Benchmarks every part of crckd-losses against the alternatives a user would otherwise pick.

Usage::

    python benchmarks/run.py                 # full grid (~15 min on a 2-core CPU)
    python benchmarks/run.py --quick         # reduced grid, under a minute (CI)
    python benchmarks/run.py --only ccd ema  # some sections
    python benchmarks/run.py --device cuda --dtype float32 bfloat16

Writes ``<out>/<device-name>.json``, ``<device-name>.md`` and ``<device-name>-*.png``
(``<device-name>-quick.*`` with ``--quick``). Every comparison first checks that the
contenders compute the same values; ratios are taken between contenders timed round-robin in
the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import measure, report, sections  # noqa: E402
from benchmarks.sections.common import fmt  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """A file-name-safe name for the device: ``cpu-<model>`` or ``cuda-<model>``."""
    model = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    return f"{device.type}-{slug}" if slug else device.type


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(device: torch.device) -> str:
    """CPU model, core count, memory and, on CUDA, the GPU."""
    parts = [cpu_model(), f"{os.cpu_count()} logical CPUs", platform.system()]
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        parts.append(f"{mem / 2**30:.0f} GiB RAM")
    except (ValueError, OSError, AttributeError):
        pass
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    return ", ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced grid, under a minute")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=DTYPES,
                        help="dtypes of the paper-size comparisons (sweeps use the first)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="output folder")
    parser.add_argument("--only", nargs="+", choices=list(sections.SECTIONS), default=None,
                        metavar="SECTION",
                        help=f"run only these sections: {', '.join(sections.SECTIONS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice; 1 with "
                        "--quick, which checks that the suite works, not speed)")
    parser.add_argument("--note", default="",
                        help="a remark recorded with the results (e.g. other load on the machine)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="on CUDA, leave out the training steps captured in a CUDA graph")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per comparison (default 5, quick 0.3)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the selected sections and writes JSON, markdown and PNGs.

    Returns:
        The results dictionary that was written.
    """
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    bench = sections.Bench(
        device=device,
        dtypes=[DTYPES[d] for d in args.dtype],
        quick=args.quick,
        budget_s=args.budget if args.budget is not None else (0.3 if args.quick else 5.0),
        cuda_graphs=args.cuda_graphs,
    )
    name = device_name(device) + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "device_name": device_name(device),
        "device": str(device),
        "machine": machine_info(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dtypes": list(args.dtype),
        "quick": args.quick,
        "timing_method": "median over round-robin rounds (order shuffled each round) after "
        "warm-up; forward+backward "
        "where there is a backward",
        "memory_method": measure.MEMORY_METHOD_CUDA if device.type == "cuda"
        else measure.MEMORY_METHOD_CPU,
        "load_start": _load(),
        "note": args.note,
        "command": "python benchmarks/run.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:])
            if not a.startswith("/") and "--out" not in a
        ),
    }
    results: dict[str, Any] = {"meta": meta, "sections": {}, "section_seconds": {}}
    start = time.perf_counter()
    for section in args.only or list(sections.SECTIONS):
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - start:6.0f} s] {section} ...", flush=True)
        results["sections"][section] = sections.SECTIONS[section].run(bench)
        results["section_seconds"][section] = round(time.perf_counter() - t0, 1)
        # Partial results survive a later section's failure.
        (args.out / f"{name}.partial.json").write_text(
            json.dumps(results, indent=1, default=_json_default)
        )
    meta["wall_s"] = time.perf_counter() - start
    meta["load_end"] = _load()
    meta["skipped"] = bench.skipped
    results["targets"] = report.compute_targets(results)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1, default=_json_default))
    report.write_markdown(results, args.out / f"{name}.md", name)
    report.write_plots(results, args.out, name)
    (args.out / f"{name}.partial.json").unlink(missing_ok=True)
    for t in results["targets"]:
        print(f"  {'MET ' if t['met'] else 'MISS' if t['met'] is False else 'n/a '} "
              f"{t['text']}: {fmt(t['value'])} ({t['detail']})")
    print(f"wrote {name}.json/.md/-*.png in {meta['wall_s']:.0f} s", flush=True)
    return results


def _json_default(x: Any) -> Any:
    if isinstance(x, float):
        return None
    return str(x)


if __name__ == "__main__":
    main()
