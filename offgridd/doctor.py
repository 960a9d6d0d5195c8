"""`offgridd doctor`: which engine this box runs, what its CPU can do, whether the two agree, and how fast it decodes.

The engine is loaded in a child process (`python -m offgridd.doctor --probe ...`), so an engine that dies with SIGILL
or SIGSEGV on this CPU is reported, not suffered; a normal path that fails is followed by the safe path, as the
daemon does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from . import engine_build
from .inference.client import describe_exit

PROBE_TIMEOUT_S = 300
# CPU flags worth showing: what the targets need, what they must not use (AMX), and ARM's optional extensions
_NOTEWORTHY = {f for t in engine_build.TARGETS.values() for f in t.needs} | {
    "amx_tile", "amx_int8", "amx_bf16", "sve", "sve2", "i8mm", "fphp"}


def _compiled(system_info: str) -> dict[str, str]:
    """llama.cpp's system info ("CPU : SSE3 = 1 | AVX = 1 | ... |") as {feature: value}."""
    out = {}
    for part in system_info.replace(":", "|").split("|"):
        key, eq, value = part.partition("=")
        if eq:
            out[key.strip()] = value.strip()
    return out


def probe(model: Path, threads: int, seconds: float, safe: bool) -> dict:
    """In the child: load the model, self-test the engine, then decode greedily for `seconds`."""
    import llama_cpp

    from .inference.engine import Engine, self_test

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    engine = Engine(model_path=str(model), n_ctx=512, n_threads=threads, n_threads_batch=threads, flash_attn=True,
                    verbose=False, safe=safe)
    checked = self_test(engine)
    tokens = engine.tokenize(b"Once upon a time, in a village by the sea,", add_bos=True)
    n, first = 0, None
    for _ in engine.generate(tokens, temp=0.0, reset=True):
        n += 1
        now = time.perf_counter()
        first = first or now
        if now - first >= seconds or n >= 400:
            break
    spent = time.perf_counter() - first if first else 0.0
    return {"system_info": info.strip(), "compiled": _compiled(info), "self_test": checked.to_dict(),
            "decode": {"tokens": n - 1, "seconds": round(spent, 2),
                       "tokens_per_second": round((n - 1) / spent, 1) if spent > 0 else 0.0}}


def _run_probe(model: Path, threads: int, seconds: float, safe: bool) -> dict:
    cmd = [sys.executable, "-m", "offgridd.doctor", "--probe", str(model), "--threads", str(threads),
           "--seconds", str(seconds)] + (["--safe"] if safe else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"ok": False, "safe": safe, "error": f"the engine did not finish within {PROBE_TIMEOUT_S}s"}
    if done.returncode == 0:
        return {"ok": True, "safe": safe, **json.loads(done.stdout)}
    if done.returncode < 0:
        error = f"the engine died with {describe_exit(done.returncode)}"
    else:
        error = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return {"ok": False, "safe": safe, "error": error}


def _default_model(settings) -> tuple[str, Path]:
    from .store import ModelStore, register_builtin

    store = ModelStore(settings.state / "models")
    store.open()
    register_builtin(store)  # as `serve` does at start: doctor may be the first thing run on a new box
    manifest = store.get(settings.model)
    return manifest.name, store.path_of(manifest)


def report(settings, threads: int, seconds: float) -> dict:
    features = engine_build.cpu_features()
    built = engine_build.installed()
    out: dict = {"cpu": {"arch": platform.machine(), "model": _cpu_model(), "features": sorted(features & _NOTEWORTHY)},
                 "engine": built, "advice": []}
    try:
        best = engine_build.pick(features=features)
        out["cpu"]["best_target"] = best.name
    except engine_build.BuildError as e:
        best = None
        out["advice"].append(str(e))
    if built is None:
        out["advice"].append("this engine was not built by `.ci/setup` or the image, so its target is unknown; "
                             "run `bash .ci/setup` to build it for this CPU")
    elif missing := [f for f in built["needs"] if f not in features]:
        out["advice"].append(f"the engine was built for {built['target']}, which needs {', '.join(missing)}; this CPU "
                             f"lacks them: rebuild with OFFGRID_ENGINE_TARGET={best.name if best else '?'} "
                             "bash .ci/setup")
    elif best and best.name != built["target"] and not os.environ.get("OFFGRID_ENGINE_TARGET"):
        out["advice"].append(f"this CPU could run the faster target {best.name}: `bash .ci/setup` rebuilds for it")
    name, path = _default_model(settings)
    out["model"] = {"name": name, "threads": threads}
    out["normal"] = _run_probe(path, threads, seconds, safe=False)
    if not out["normal"]["ok"]:
        out["safe"] = _run_probe(path, threads, seconds, safe=True)
        out["advice"].append(
            f"the engine fails on its normal path ({out['normal']['error']}); the daemon serves on the safe path "
            "without repacked weights" if out["safe"]["ok"] else
            "the engine fails on both paths: rebuild it for a smaller target (OFFGRID_ENGINE_TARGET, see "
            "`python3 -m offgridd.engine_build list`) and run doctor again")
    out["verdict"] = "ok" if out["normal"]["ok"] else "safe-path" if out.get("safe", {}).get("ok") else "broken"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_report(r: dict) -> None:
    e = r["engine"]
    print(f"engine     {'llama-cpp-python ' + e['llama_cpp_python'] + ', built for ' + e['target'] if e else 'unknown'}"
          + (f" ({e['boards']})" if e else ""))
    if e:
        print(f"           {' '.join(e['cmake_args'])}")
    cpu = r["cpu"]
    print(f"cpu        {cpu['arch']}, {cpu['model']}; best target {cpu.get('best_target', '?')}")
    print(f"           {' '.join(cpu['features']) or '(no flags read)'}")
    for path in ("normal", "safe"):
        if (p := r.get(path)) is None:
            continue
        if not p["ok"]:
            print(f"{path:10} FAILED: {p['error']}")
            continue
        on = [k for k, v in p["compiled"].items() if v == "1"]
        st, d = p["self_test"], p["decode"]
        print(f"compiled   {' '.join(on)}")
        print(f"{path:10} self-test passed: {st['tokens']} tokens in {st['seconds']:.2f}s ({st['text']!r})")
        print(f"decode     {d['tokens_per_second']:.1f} tok/s over {d['seconds']:.1f}s "
              f"({r['model']['name']}, {r['model']['threads']} threads)")
    for line in r["advice"]:
        print(f"advice     {line}")
    print(f"verdict    {r['verdict']}")


def main(argv: list[str] | None = None) -> int:
    """The probe child's entry point."""
    parser = argparse.ArgumentParser(prog="offgridd-doctor-probe")
    parser.add_argument("--probe", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--safe", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.probe, args.threads, args.seconds, args.safe)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
