"""The engine is built for a named CPU target, never for whatever the build machine happens to be."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

import pytest
from boards import PI4_CPUINFO, PI_CPUINFO

from offgridd import engine_build
from offgridd.engine_build import TARGETS, cpu_features, pick

# /proc/cpuinfo flags of an Intel Xeon Platinum 8488C (Sapphire Rapids, AWS m7i), where AMX kernels crash llama.cpp
SAPPHIRE_RAPIDS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht syscall "
    "nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni "
    "pclmulqdq monitor ssse3 fma cx16 pdcm pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx "
    "f16c rdrand hypervisor lahf_lm abm 3dnowprefetch invpcid_single ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase "
    "tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb "
    "avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd ida arat "
    "avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg tme "
    "avx512_vpopcntdq rdpid cldemote movdiri movdir64b md_clear serialize amx_bf16 avx512_fp16 amx_tile amx_int8 "
    "flush_l1d arch_capabilities")
# Intel Core i5-8250U (Kaby Lake R): AVX2 but no AVX-512
KABY_LAKE = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 sse4_1 sse4_2 popcnt movbe avx f16c "
             "fma bmi1 avx2 bmi2 erms")
# qemu's default qemu64 CPU: baseline x86-64 with SSE4.2 turned on by the boot test's -cpu options, no AVX
OLD_X86 = "fpu de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 sse4_1 sse4_2 popcnt"


def features_of(tmp_path: Path, cpuinfo: str) -> set[str]:
    (tmp_path / "proc").mkdir(exist_ok=True)
    (tmp_path / "proc/cpuinfo").write_text(cpuinfo)
    return cpu_features(tmp_path)


@pytest.mark.parametrize(("cpuinfo", "arch", "expected"), [
    (f"processor\t: 0\nflags\t\t: {SAPPHIRE_RAPIDS}\n", "x86_64", "x86-64-avx512"),
    (f"processor\t: 0\nflags\t\t: {KABY_LAKE}\n", "x86_64", "x86-64-avx2"),
    (f"processor\t: 0\nflags\t\t: {OLD_X86}\n", "x86_64", "x86-64-v2"),
    (PI_CPUINFO, "aarch64", "armv8.2-a"),
    (PI4_CPUINFO, "aarch64", "armv8-a"),
])
def test_each_cpu_gets_the_fastest_target_it_can_run(tmp_path, monkeypatch, cpuinfo, arch, expected):
    monkeypatch.delenv("OFFGRID_ENGINE_TARGET", raising=False)
    features = features_of(tmp_path, cpuinfo)
    chosen = pick(arch, features)
    assert chosen.name == expected
    assert set(chosen.needs) <= features


def test_an_amx_xeon_gets_an_engine_without_amx_and_no_target_is_native():
    for t in TARGETS.values():
        args = t.cmake_args()
        assert "-DGGML_NATIVE=OFF" in args
        assert not any(a.startswith("-DGGML_AMX") and a.endswith("=ON") for a in args)
        if t.arch == "x86_64":  # every switch written out: ggml turns unnamed ones ON when GGML_NATIVE is OFF
            assert {a.split("=")[0] for a in args} >= {f"-DGGML_{s}" for s in engine_build._X86_SWITCHES}
    assert "-DGGML_AMX_INT8=OFF" in TARGETS["x86-64-avx512"].cmake_args()


def test_one_variable_overrides_the_pick_and_a_typo_is_named(monkeypatch):
    monkeypatch.setenv("OFFGRID_ENGINE_TARGET", "x86-64-v2")
    assert pick("x86_64", {"avx512f"}).name == "x86-64-v2"
    monkeypatch.setenv("OFFGRID_ENGINE_TARGET", "x86-64-avx3")
    with pytest.raises(engine_build.BuildError, match="unknown engine target 'x86-64-avx3'; known: x86-64-v2"):
        pick()


def test_a_change_of_flags_is_a_different_wheel_folder():
    version = engine_build.engine_version()
    folders = {engine_build.wheel_dir(t, version) for t in TARGETS.values()}
    assert len(folders) == len(TARGETS)
    assert all(f.is_relative_to(engine_build.WHEELS) and version in str(f) for f in folders)


def test_the_installed_engine_was_built_for_a_named_target_this_cpu_runs():
    record = engine_build.installed()
    assert record is not None, "the engine in this environment was not installed by offgridd.engine_build"
    assert record["llama_cpp_python"] == importlib.metadata.version("llama_cpp_python")
    assert record["arch"] == platform.machine()
    assert record["cmake_args"] == TARGETS[record["target"]].cmake_args()
    assert set(record["needs"]) <= cpu_features()
