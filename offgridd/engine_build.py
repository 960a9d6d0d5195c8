"""Which CPU the engine (llama.cpp, through llama-cpp-python) is compiled for, and building it for that target.

A `-march=native` build compiles in every kernel the build machine has, so an engine built on one CPU can die on
another, and on an AMX Xeon the AMX kernels themselves crash (ggml-org/llama.cpp#20824). So the engine is built for a
named target from TARGETS, chosen from /proc/cpuinfo (or OFFGRID_ENGINE_TARGET), with every instruction-set switch
written out. Wheels go to a project-owned folder keyed by version and flags, never pip's cache (keyed by the sdist
alone, it hands back a wheel built with other flags).

Standard library only: `.ci/setup`, `image/` and `bench/` run it before anything else is installed.
    python -m offgridd.engine_build pick | cmake-args [TARGET] | wheel [TARGET] | install [TARGET]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".wheels"
RECORD = "offgridd-engine.json"  # written into the environment the engine is installed in

_X86_SWITCHES = ("SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C", "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
                 "AVX512_BF16", "AMX_TILE", "AMX_INT8", "AMX_BF16")


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    name: str
    arch: str  # uname -m of the machines it runs on
    boards: str
    needs: tuple[str, ...]  # /proc/cpuinfo flags (x86) or Features (arm) the CPU must have
    on: tuple[str, ...] = ()  # x86 GGML_* switches turned on; every other one is turned off
    arm_arch: str = ""  # GGML_CPU_ARM_ARCH

    def cmake_args(self) -> list[str]:
        args = ["-DGGML_NATIVE=OFF", "-DGGML_OPENMP=ON"]
        if self.arch == "x86_64":
            args += [f"-DGGML_{s}={'ON' if s in self.on else 'OFF'}" for s in _X86_SWITCHES]
        else:
            args.append(f"-DGGML_CPU_ARM_ARCH={self.arm_arch}")
        return args


# AMX is never on: its kernels crash llama_decode on Sapphire Rapids (ggml-org/llama.cpp#20824).
_AVX2 = ("SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C")
TARGETS = {t.name: t for t in (
    Target(name="x86-64-v2", arch="x86_64", boards="x86-64 CPUs without AVX2, and qemu's default CPU",
           needs=("sse4_2", "ssse3", "popcnt"), on=("SSE42",)),
    Target(name="x86-64-avx2", arch="x86_64", boards="x86-64-v3: Intel since Haswell, AMD since Zen, qemu -cpu max",
           needs=("avx", "avx2", "fma", "f16c", "bmi2"), on=_AVX2),
    Target(name="x86-64-avx512", arch="x86_64",
           boards="AVX-512, AMX left out: Intel Sapphire Rapids and later, AMD Zen 4",
           needs=("avx2", "fma", "f16c", "bmi2", "avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw",
                  "avx512vbmi", "avx512_vnni", "avx512_bf16", "avx_vnni"),
           on=_AVX2 + ("AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16")),
    Target(name="armv8-a", arch="aarch64", boards="Raspberry Pi 4 and Zero 2 W (Cortex-A72/A53), Jetson Nano (A57)",
           needs=("asimd",), arm_arch="armv8-a"),
    Target(name="armv8.2-a", arch="aarch64", boards="Raspberry Pi 5 (Cortex-A76), Jetson Orin (Cortex-A78AE)",
           needs=("asimd", "asimddp", "asimdhp"), arm_arch="armv8.2-a+dotprod+fp16"),
)}


class BuildError(Exception):
    pass


def cpu_features(root: Path = Path("/")) -> set[str]:
    """The CPU's instruction-set flags: x86's `flags` or ARM's `Features` line of cpuinfo."""
    try:
        text = (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def pick(arch: str | None = None, features: set[str] | None = None) -> Target:
    """The fastest target this CPU can run, or the one named by OFFGRID_ENGINE_TARGET."""
    if name := os.environ.get("OFFGRID_ENGINE_TARGET"):
        return target(name)
    arch = arch or platform.machine()
    features = cpu_features() if features is None else features
    fits = [t for t in TARGETS.values() if t.arch == arch and set(t.needs) <= features]
    if fits:
        return fits[-1]  # TARGETS lists each architecture's targets slowest first
    same_arch = [t for t in TARGETS.values() if t.arch == arch]
    if not same_arch:
        raise BuildError(f"no engine target for {arch!r}; known: {', '.join(TARGETS)}")
    return same_arch[0]


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise BuildError(f"unknown engine target {name!r}; known: {', '.join(TARGETS)}") from None


def engine_version() -> str:
    """The llama-cpp-python version pinned in pyproject.toml: one place says which engine offgridd runs."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        if m := re.fullmatch(r"llama-cpp-python==([\w.]+)", dep.replace(" ", "")):
            return m.group(1)
    raise BuildError("pyproject.toml does not pin llama-cpp-python==VERSION")


def wheel_dir(t: Target, version: str) -> Path:
    key = hashlib.sha256(" ".join(t.cmake_args()).encode()).hexdigest()[:12]
    return WHEELS / f"llama-cpp-python-{version}" / f"{t.name}-{key}"


def _toolchain(t: Target, where: Path) -> list[str]:
    """CMake arguments to cross-compile for another architecture with Debian's cross gcc."""
    if t.arch == platform.machine():
        return []
    triple = f"{t.arch}-linux-gnu"
    if not shutil.which(f"{triple}-gcc"):
        raise BuildError(f"cross-building for {t.arch} needs {triple}-gcc (apt-get install gcc-{triple} g++-{triple})")
    file = where / f"{t.arch}.cmake"
    file.write_text(f"set(CMAKE_SYSTEM_NAME Linux)\nset(CMAKE_SYSTEM_PROCESSOR {t.arch})\n"
                    f"set(CMAKE_C_COMPILER {triple}-gcc)\nset(CMAKE_CXX_COMPILER {triple}-g++)\n"
                    f"set(CMAKE_FIND_ROOT_PATH /usr/{triple})\n"
                    "set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)\nset(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)\n"
                    "set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)\n")
    return [f"-DCMAKE_TOOLCHAIN_FILE={file}"]


def build_wheel(t: Target, version: str | None = None, python: str = sys.executable) -> Path:
    """The engine's wheel for target t, built unless this folder already holds it; returns its path."""
    version = version or engine_version()
    out = wheel_dir(t, version)
    if wheels := sorted(out.glob("llama_cpp_python-*.whl")):
        return wheels[-1]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="engine-") as tmp:
        work = Path(tmp)
        args = t.cmake_args() + _toolchain(t, work)
        env = {**os.environ, "CMAKE_ARGS": " ".join(args), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        print(f"building llama-cpp-python {version} for {t.name} ({t.boards}); several minutes", file=sys.stderr)
        subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary",
                        "llama-cpp-python", "-w", str(work), f"llama-cpp-python=={version}"], env=env, check=True,
                       stdout=sys.stderr)
        built = next(work.glob("llama_cpp_python-*.whl"))
        if t.arch != platform.machine():  # pip tagged it for the build machine
            subprocess.run([python, "-m", "wheel", "tags", "--platform-tag", f"linux_{t.arch}", "--remove",
                            str(built)], check=True, stdout=sys.stderr)
            built = next(work.glob("llama_cpp_python-*.whl"))
        shutil.move(built, out / built.name)
    (out / RECORD).write_text(json.dumps(record(t, version), indent=2) + "\n")
    return out / built.name


def record(t: Target, version: str) -> dict:
    return {"target": t.name, "arch": t.arch, "boards": t.boards, "needs": list(t.needs),
            "cmake_args": t.cmake_args(), "llama_cpp_python": version}


def installed(prefix: Path = Path(sys.prefix)) -> dict | None:
    """What install() wrote into this environment: the target its engine was built for."""
    try:
        return json.loads((prefix / RECORD).read_text())
    except (OSError, ValueError):
        return None


def install(t: Target, python: str = sys.executable) -> None:
    """Install the engine for t into `python`'s environment, unless the one there was built for t already."""
    prefix = Path(subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                                 check=True).stdout.strip())
    version = engine_version()
    if installed(prefix) == record(t, version):
        print(f"engine {version} for {t.name} already installed", file=sys.stderr)
        return
    wheel = build_wheel(t, version, python)
    subprocess.run([python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheel)], check=True)
    (prefix / RECORD).write_text(json.dumps(record(t, version), indent=2) + "\n")
    print(f"engine {version} for {t.name} installed from {wheel}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offgridd.engine_build", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("pick", "cmake-args", "wheel", "install", "list"))
    parser.add_argument("target", nargs="?", help="a name from the table (default: picked for this CPU)")
    args = parser.parse_args(argv)
    try:
        t = target(args.target) if args.target else pick()
        if args.action == "pick":
            print(t.name)
        elif args.action == "list":
            for t in TARGETS.values():
                print(f"{t.name:14} {t.arch:8} {t.boards}")
        elif args.action == "cmake-args":
            print(" ".join(t.cmake_args()))
        elif args.action == "wheel":
            print(build_wheel(t))
        else:
            install(t)
    except (BuildError, subprocess.CalledProcessError) as e:
        print(f"engine build: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
