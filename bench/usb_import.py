"""USB import throughput against `cp` then `sha256sum` of the same file, run one after the other.

The import copies once while hashing, then checks the GGUF header and fsyncs; the baseline reads the file twice
(cp, then sha256sum) and does not fsync. Page caches are dropped before each run when this runs as root, so every
run reads the source from disk. Prints one JSON object; the ratio is baseline time / import time (>= 1: as fast).

    .venv/bin/python bench/usb_import.py [--mib 1024] [--runs 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from usb_images import big_gguf, entry, write_manifest  # noqa: E402

from offgridd.db import Database  # noqa: E402
from offgridd.events import EventBus  # noqa: E402
from offgridd.jobs import JobBoard  # noqa: E402
from offgridd.store import ModelStore  # noqa: E402
from offgridd.usb import import_stick  # noqa: E402


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn) -> tuple[float, bool]:
    cold = drop_caches()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, cold


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="model size")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp", help="where the stick and the stores are written")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="usb-bench-") as work:
        work = Path(work)
        stick = work / "stick"
        (stick / "OFFGRID").mkdir(parents=True)
        data = big_gguf(stick / "OFFGRID" / "model.gguf", args.mib)
        write_manifest(stick, [entry("bench", "OFFGRID/model.gguf", data)])
        size = len(data)
        del data
        src = stick / "OFFGRID" / "model.gguf"

        def baseline() -> None:
            dest = work / "cp-copy.gguf"
            subprocess.run(["cp", str(src), str(dest)], check=True)
            subprocess.run(["sha256sum", str(src)], check=True, stdout=subprocess.DEVNULL)

        def one_pass() -> None:
            state = work / "box"
            db = Database(state / "offgridd.db")
            try:
                report = import_stick(stick, store=ModelStore(state / "models"), jobs=JobBoard(db, EventBus()))
            finally:
                db.close()
            assert report.ok and report.results[0].state == "done", report.to_dict()

        results = {"baseline": [], "import": []}
        cold = True
        for _ in range(args.runs):
            for name, fn in (("baseline", baseline), ("import", one_pass)):
                seconds, was_cold = timed(fn)
                cold &= was_cold
                results[name].append(seconds)
                shutil.rmtree(work / "box", ignore_errors=True)
                (work / "cp-copy.gguf").unlink(missing_ok=True)
        base, imp = statistics.median(results["baseline"]), statistics.median(results["import"])
        print(
            json.dumps(
                {
                    "bytes": size,
                    "runs": args.runs,
                    "cold_cache": cold,
                    "cp_then_sha256sum_s": round(base, 3),
                    "import_s": round(imp, 3),
                    "cp_then_sha256sum_mb_s": round(size / base / 1e6, 1),
                    "import_mb_s": round(size / imp / 1e6, 1),
                    "ratio_baseline_over_import": round(base / imp, 2),
                    "all_s": {k: [round(v, 3) for v in vs] for k, vs in results.items()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
