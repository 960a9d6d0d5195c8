#!/usr/bin/env python3
"""Benchmark offgridd against llama.cpp's own llama-server on the same model.

One command does everything: build (or find) llama-server from the llama.cpp sources
vendored in the installed llama-cpp-python sdist, start offgridd and llama-server on free
loopback ports with the same threads and context, warm both up, measure interleaved
(A, B, A, B, ...), stop both, print a markdown table and write JSON to bench/results/.

    .venv/bin/python bench/bench.py --threads 2 --ctx 2048 --runs 5

Only the standard library and aiohttp are used. See bench/README.md for methodology.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import psutil

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BUILD_DIR = BENCH_DIR / ".build"
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_STATE = BUILD_DIR / "state"
LOG_DIR = BUILD_DIR / "logs"

# A raw prompt that invites a long continuation; both servers get exactly the same text.
# Each request is prefixed with a unique tag so neither server can reuse a cached prompt
# prefix from an earlier request (llama-server's prompt cache, llama-cpp-python's
# prefix match): every TTFT includes full prompt processing on both sides.
BASE_PROMPT = (
    "The following is the complete text of a long travel diary kept by a geologist who walked "
    "from the northern coast to the southern mountains over one summer. Every entry is long and "
    "detailed, describing the weather, the rocks, the rivers, the villages, the food, and the "
    "people met along the way. The diary has no conclusion; it simply continues day after day.\n\n"
    "Day 1. I left the harbour town at dawn with a heavy pack, a hammer, two notebooks and a map "
    "that was already out of date. The cliffs north of the town are layered sandstone, red and "
    "grey, and the tide had exposed a wide shelf of ripple-marked rock. I spent the morning"
)

NAMES = ("offgridd", "llama-server")


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # the child keeps its own copy of the fd
        print(f"[bench] starting {self.name}: {' '.join(self.cmd)}", file=sys.stderr)
        # Own process group: the daemon's worker child can be cleaned up with it.
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=self.env,
        )
        log.close()

    def wait_healthy(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}; see {self.log_path}\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, OSError, TimeoutError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f}s; see {self.log_path}\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        print(f"[bench] stopping {self.name} (pid {p.pid})", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        # Whatever is left of the process group we created (e.g. a worker child) is killed.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    return children


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of a process and all its descendants (Linux /proc)."""
    children = _proc_children()
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
        stack.extend(children.get(p, []))
    return total


def idle_cpu_percent(servers: list[Server], seconds: float = 3.0) -> dict[str, float]:
    before = {s.name: tree_cpu_seconds(s.proc.pid) for s in servers if s.proc}
    time.sleep(seconds)
    return {
        s.name: round(100 * (tree_cpu_seconds(s.proc.pid) - before[s.name]) / seconds, 1) for s in servers if s.proc
    }


# --------------------------------------------------------------------------- build / find


def installed_llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("llama-cpp-python is not installed in this interpreter; pass --llama-cpp-version")


def build_or_find_llama_server(version: str, jobs: int) -> Path:
    """The script knows the engine's CPU target and reuses a binary built for it (the first build takes a while)."""
    env = dict(os.environ, PYTHON=sys.executable, JOBS=str(jobs))
    out = subprocess.run(
        ["bash", str(BENCH_DIR / "build_llama_server.sh"), version],
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    path = Path(out.strip().splitlines()[-1])
    if not path.is_file():
        sys.exit(f"build script did not produce {path}")
    return path


def offgridd_env() -> dict[str, str]:
    """Environment for offgridd with no outside settings leaking in (config file, OFFGRID_* vars).

    Only the command-line flags the benchmark passes apply, plus offgridd's built-in defaults.
    """
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    empty_config = BUILD_DIR / "offgridd-bench.toml"
    empty_config.write_text("# intentionally empty: bench/bench.py passes everything as flags\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
    env["OFFGRID_CONFIG"] = str(empty_config)
    return env


def offgridd_model(offgridd: str, state: Path, name: str, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [offgridd, "models", "list", "--json", "--state", str(state)],
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        timeout=120,
    ).stdout
    for m in json.loads(out):
        if m.get("name") == name:
            return m
    sys.exit(f"model {name!r} not registered in {state}; got {out!r}")


# --------------------------------------------------------------------------- measurement


@dataclass
class Sample:
    server: str
    kind: str  # "c1", "c2", ...: how many streams ran at once
    round: int
    t_send: float
    t_first: float | None = None  # first non-empty content chunk
    t_last: float | None = None  # last non-empty content chunk
    t_done: float | None = None  # [DONE] / end of stream
    chunks: int = 0  # non-empty content chunks
    usage_tokens: int | None = None  # usage.completion_tokens
    prompt_tokens: int | None = None
    foreign_cpu_pct: float = 0.0  # CPU used by other processes during this measurement, % of one core
    steal_cpu_pct: float = 0.0  # hypervisor steal during this measurement, % of one core
    finish_reason: str | None = None
    text: str = field(default="", repr=False)

    def tokens(self, method: str) -> int:
        return self.usage_tokens if method == "usage" and self.usage_tokens is not None else self.chunks


async def stream_completion(session: aiohttp.ClientSession, base: str, payload: dict, sample: Sample) -> Sample:
    sample.t_send = time.perf_counter()
    async with session.post(base + "/v1/completions", json=payload) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{sample.server}: HTTP {resp.status}: {(await resp.text())[:500]}")
        parts: list[str] = []
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"{sample.server}: stream error {obj['error']}")
            now = time.perf_counter()
            for choice in obj.get("choices") or []:
                text = choice.get("text") or ""
                if text:
                    if sample.t_first is None:
                        sample.t_first = now
                    sample.t_last = now
                    sample.chunks += 1
                    parts.append(text)
                if choice.get("finish_reason"):
                    sample.finish_reason = choice["finish_reason"]
            usage = obj.get("usage")
            if usage:
                sample.usage_tokens = usage.get("completion_tokens")
                sample.prompt_tokens = usage.get("prompt_tokens")
    sample.t_done = time.perf_counter()
    sample.text = "".join(parts)
    if sample.t_first is None:
        raise RuntimeError(f"{sample.server}: no content streamed")
    return sample


def make_payload(name: str, model: str, tag: str, max_tokens: int, temperature: float = 0.0) -> dict:
    payload = {
        "model": model,
        "prompt": f"[{tag}] " + BASE_PROMPT,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if name == "llama-server":
        # llama.cpp extensions: never stop at EOS, generate exactly max_tokens.
        payload.update({"n_predict": max_tokens, "ignore_eos": True})
    return payload


class CpuMeter:
    """Machine CPU used by anything other than the two servers and this client during a measurement.

    On 2 cores any foreign load (another build, a test run) distorts the figures, so each
    measurement records it and a round that was disturbed is measured again.
    Values are in percent of one core (100 = one core fully busy); steal is reported apart.
    """

    def __init__(self, servers: list[Server]) -> None:
        self.pids = [s.proc.pid for s in servers if s.proc]

    @staticmethod
    def _system() -> tuple[float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        tick = os.sysconf("SC_CLK_TCK")
        return (user + nice + system + irq + softirq) / tick, steal / tick

    def snapshot(self) -> tuple[float, float, float, float]:
        busy, steal = self._system()
        ours = sum(tree_cpu_seconds(pid) for pid in self.pids) + tree_cpu_seconds(os.getpid())
        return time.monotonic(), busy, steal, ours

    @staticmethod
    def foreign(before: tuple, after: tuple) -> tuple[float, float]:
        wall = max(after[0] - before[0], 1e-9)
        other = (after[1] - before[1]) - (after[3] - before[3])
        return round(100 * max(other, 0.0) / wall, 1), round(100 * (after[2] - before[2]) / wall, 1)


async def wait_quiet(meter: CpuMeter, threshold: float, max_wait: float) -> None:
    """Wait (up to max_wait s) until other processes use at most `threshold` % of one core."""
    t0 = time.monotonic()
    announced = False
    while True:
        before = meter.snapshot()
        await asyncio.sleep(2)
        foreign, steal = meter.foreign(before, meter.snapshot())
        if foreign + steal <= threshold:
            return
        if time.monotonic() - t0 > max_wait:
            print(
                f"[bench] machine still busy ({foreign + steal:.0f}%) after {max_wait:.0f}s; measuring", file=sys.stderr
            )
            return
        if not announced:
            print(f"[bench] other processes use {foreign + steal:.0f}% of a core; waiting for quiet", file=sys.stderr)
            announced = True


async def measure(servers: list[Server], args: argparse.Namespace) -> tuple[list[Sample], list[Sample]]:
    """Interleaved rounds; returns (kept samples, samples of discarded noisy attempts)."""
    timeout = aiohttp.ClientTimeout(total=1800)
    samples: list[Sample] = []
    discarded: list[Sample] = []
    meter = CpuMeter(servers)
    connector = aiohttp.TCPConnector(limit=0)

    def payload(s: Server, tag: str) -> dict:
        return make_payload(s.name, args.model, tag, args.max_tokens, args.temperature)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for s in servers:
            print(f"[bench] warm-up {s.name}", file=sys.stderr)
            warm = Sample(s.name, "warmup", -1, 0.0)
            await stream_completion(session, s.base, payload(s, "warmup"), warm)

        async def one(s: Server, kind: str, r: int, tag: str) -> list[Sample]:
            n = int(kind[1:])
            batch = [Sample(s.name, kind, r, 0.0) for _ in range(n)]
            before = meter.snapshot()
            await asyncio.gather(
                *(
                    stream_completion(
                        session, s.base, payload(s, f"{tag} {k}"), x
                    )
                    for k, x in enumerate(batch)
                )
            )
            foreign, steal = meter.foreign(before, meter.snapshot())
            for x in batch:
                x.foreign_cpu_pct, x.steal_cpu_pct = foreign, steal
            wall = max(x.t_done for x in batch) - min(x.t_send for x in batch)
            ttft = statistics.mean(1000 * (x.t_first - x.t_send) for x in batch)
            print(
                f"[bench] round {r} {kind:10} {s.name:12}: {sum(x.tokens('usage') for x in batch)} tokens "
                f"in {wall:.2f} s, mean ttft {ttft:.0f} ms, foreign cpu {foreign:.0f}%, steal {steal:.0f}%",
                file=sys.stderr,
            )
            return batch

        for r in range(args.runs):
            for attempt in range(args.max_retries + 1):
                await wait_quiet(meter, args.noise_threshold, args.quiet_wait)
                got: list[Sample] = []
                # each level of concurrency on A, then on B; every other round B goes first, so neither server
                # always follows the other's concurrent burst
                order = servers if r % 2 == 0 else servers[::-1]
                for kind in (f"c{n}" for n in args.levels):
                    for s in order:
                        got += await one(s, kind, r, f"run {r}.{attempt} {kind}")
                noise = max(x.foreign_cpu_pct + x.steal_cpu_pct for x in got)
                if noise <= args.noise_threshold or attempt == args.max_retries:
                    if noise > args.noise_threshold:
                        print(f"[bench] round {r}: still noisy ({noise:.0f}%), kept anyway", file=sys.stderr)
                    samples += got
                    break
                print(f"[bench] round {r}: other load {noise:.0f}% of a core, measuring it again", file=sys.stderr)
                discarded += got
    return samples, discarded


# --------------------------------------------------------------------------- summary


def summarize(samples: list[Sample], runs: int) -> tuple[dict, str]:
    method = "usage" if all(s.usage_tokens is not None for s in samples) else "chunks"
    per: dict[str, dict[str, list[float]]] = {n: {} for n in NAMES}

    def add(name: str, key: str, value: float) -> None:
        per[name].setdefault(key, []).append(value)

    levels = sorted({int(s.kind[1:]) for s in samples})
    for name in NAMES:
        for r in range(runs):
            single = [s for s in samples if s.server == name and s.kind == "c1" and s.round == r]
            for s in single:
                n = s.tokens(method)
                add(name, "ttft_ms", 1000 * (s.t_first - s.t_send))
                if n > 1 and s.t_last > s.t_first:
                    add(name, "decode_tps", (n - 1) / (s.t_last - s.t_first))
                add(name, "e2e_tps", n / (s.t_done - s.t_send))
            for level in levels:
                conc = [s for s in samples if s.server == name and s.kind == f"c{level}" and s.round == r]
                if conc:
                    wall = max(s.t_done for s in conc) - min(s.t_send for s in conc)
                    add(name, f"c{level}_agg_tps", sum(s.tokens(method) for s in conc) / wall)
                    add(name, f"c{level}_ttft_ms", statistics.mean(1000 * (s.t_first - s.t_send) for s in conc))
                    add(name, f"c{level}_tokens", statistics.mean(s.tokens(method) for s in conc))

    rows = [
        ("single-stream decode tok/s", "decode_tps", "higher"),
        ("single-stream end-to-end tok/s", "e2e_tps", "higher"),
        ("TTFT single stream (ms)", "ttft_ms", "lower"),
    ]
    for level in levels:
        if level > 1:
            rows += [(f"{level} concurrent: total tok/s", f"c{level}_agg_tps", "higher"),
                     (f"{level} concurrent: mean TTFT (ms)", f"c{level}_ttft_ms", "lower")]
    rows += [(f"completion tokens / request ({level} at once)", f"c{level}_tokens", "") for level in levels]
    summary: dict = {"token_count_method": method, "metrics": {}}
    lines = [
        "| metric | offgridd | llama-server | offgridd / llama-server | same-round ratios, median (min–max) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, key, better in rows:
        a, b = per["offgridd"].get(key, []), per["llama-server"].get(key, [])
        if not a or not b:
            continue
        ma, mb = statistics.median(a), statistics.median(b)
        ratio = ma / mb if mb else float("nan")
        # the two servers measured in the same round share that round's machine noise
        paired = [x / y for x, y in zip(a, b, strict=True) if y] if len(a) == len(b) else []
        summary["metrics"][key] = {
            "label": label,
            "better": better,
            "offgridd": {"median": ma, "min": min(a), "max": max(a), "values": a},
            "llama-server": {"median": mb, "min": min(b), "max": max(b), "values": b},
            "ratio_median": ratio,
            "paired_ratios": paired,
        }
        fmt = "{:.0f}" if key.endswith("_ms") or "tokens" in key else "{:.1f}"
        cell_a = f"{fmt.format(ma)} ({fmt.format(min(a))}–{fmt.format(max(a))})"
        cell_b = f"{fmt.format(mb)} ({fmt.format(min(b))}–{fmt.format(max(b))})"
        hint = f" ({better} is better)" if better else ""
        cell_p = (f"{statistics.median(paired):.2f} ({min(paired):.2f}–{max(paired):.2f})"
                  if paired and better else "")
        lines.append(f"| {label}{hint} | {cell_a} | {cell_b} | {ratio:.2f} | {cell_p} |")
    return summary, "\n".join(lines)


def tree_rss_bytes(server: Server) -> int:
    """Resident memory of a server process and its children (offgridd's daemon plus its worker)."""
    try:
        root = psutil.Process(server.proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def llama_server_version(binary: Path) -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        return " ".join((out.stdout + out.stderr).split())[:300]
    return "unknown"


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="threads for both servers (-t/-tb for llama-server)")
    p.add_argument("--ctx", type=int, default=2048, help="context size for both servers")
    p.add_argument("--runs", type=int, default=5, help="interleaved measurement rounds")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 picks the top token; above 0 both servers sample with their (equal) default top-k/p, min-p")
    p.add_argument("--levels", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4, 8],
                   help="how many streams run at once in each measurement, comma-separated")
    p.add_argument("--parallel", type=int, default=4,
                   help="sequences each server decodes together (llama-server -np, offgridd's parallel)")
    p.add_argument("--model", default="gemma3-270m", help="offgridd model name")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE, help="persistent offgridd state dir")
    p.add_argument("--offgridd", default=str(ROOT / ".venv" / "bin" / "offgridd"), help="offgridd executable")
    p.add_argument("--llama-server", type=Path, help="use this llama-server binary instead of building one")
    p.add_argument("--llama-cpp-version", help="llama-cpp-python version whose sdist to build (default: installed)")
    p.add_argument("--jobs", type=int, default=2, help="compile jobs when building llama-server")
    p.add_argument(
        "--noise-threshold",
        type=float,
        default=15.0,
        help="re-measure a round when other processes (or steal) used more than this %% of one core",
    )
    p.add_argument("--max-retries", type=int, default=3, help="re-measurements per noisy round")
    p.add_argument("--quiet-wait", type=float, default=900, help="max seconds to wait for a quiet machine per round")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    version = args.llama_cpp_version or installed_llama_cpp_version()
    llama_bin = args.llama_server or build_or_find_llama_server(version, args.jobs)
    if not shutil.which(args.offgridd):
        sys.exit(f"offgridd executable not found: {args.offgridd}")
    args.state.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    threads, ctx = str(args.threads), str(args.ctx)

    port = free_port()
    off_cmd = [args.offgridd, "serve", "--host", "127.0.0.1", "--port", str(port), "--state", str(args.state)]
    off_cmd += ["--threads", threads, "--ctx", ctx]
    off_env = {**offgridd_env(), "OFFGRID_PARALLEL": str(args.parallel)}
    off = Server("offgridd", off_cmd, port, LOG_DIR / f"offgridd-{stamp}.log", env=off_env)
    servers: list[Server] = [off]
    try:
        off.start()
        t_off = off.wait_healthy(args.startup_timeout)
        print(f"[bench] offgridd healthy after {t_off:.1f}s", file=sys.stderr)
        manifest = offgridd_model(args.offgridd, args.state, args.model, off_env)
        model_path = manifest["path"]

        port = free_port()
        # offgridd gives each of its sequences ctx cells; llama-server splits -c between its slots
        llama_flags = ["-t", threads, "-tb", threads, "-c", str(args.ctx * args.parallel), "-np", str(args.parallel),
                       "--no-webui"]
        llama_cmd = [str(llama_bin), "-m", model_path, "--host", "127.0.0.1", "--port", str(port)]
        llama_cmd += ["--alias", args.model, *llama_flags]
        llama = Server("llama-server", llama_cmd, port, LOG_DIR / f"llama-server-{stamp}.log")
        servers.append(llama)
        llama.start()
        t_llama = llama.wait_healthy(args.startup_timeout)
        print(f"[bench] llama-server healthy after {t_llama:.1f}s", file=sys.stderr)

        idle = idle_cpu_percent(servers)
        print(f"[bench] idle CPU% of each server process tree: {idle}", file=sys.stderr)
        t0 = time.time()
        samples, discarded = asyncio.run(measure(servers, args))
        elapsed = time.time() - t0
        memory = {s.name: tree_rss_bytes(s) for s in servers}
    finally:
        for s in reversed(servers):
            s.stop()

    summary, table = summarize(samples, args.runs)
    header = (
        f"offgridd vs llama-server — {args.model} ({Path(model_path).name[:16]}…), threads={args.threads}, "
        f"ctx={args.ctx}, max_tokens={args.max_tokens}, temperature={args.temperature}, runs={args.runs}, "
        f"levels={args.levels}, parallel={args.parallel}, "
        f"tokens counted by {summary['token_count_method']}; median (min–max); "
        f"{len(discarded) and len({(x.round, x.kind) for x in discarded})} noisy measurement(s) re-run, "
        f"max other-process load kept {max(x.foreign_cpu_pct + x.steal_cpu_pct for x in samples):.0f}% of a core"
    )
    print()
    print(header)
    print()
    print(table)
    print()
    print("ratio = offgridd / llama-server: >1 is better for tok/s, <1 is better for TTFT.")
    print("resident memory after the run (server and its children): "
          + ", ".join(f"{name} {rss / 2**20:.0f} MiB" for name, rss in memory.items()))

    result = {
        "timestamp": stamp,
        "elapsed_s": elapsed,
        "memory_rss_bytes": memory,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "cpu": cpu_model(),
            "nproc": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "llama_cpp_python": version,
        "llama_server": {"binary": str(llama_bin), "version": llama_server_version(llama_bin), "cmd": llama.cmd},
        "offgridd": {"cmd": off.cmd},
        "model": manifest,
        "idle_cpu_percent": idle,
        "prompt_prefix_format": "[<unique tag>] ",
        "base_prompt": BASE_PROMPT,
        "summary": summary,
        "table_markdown": table,
        "samples": [{k: v for k, v in asdict(s).items() if k != "text"} for s in samples],
        "discarded_noisy_samples": [{k: v for k, v in asdict(s).items() if k != "text"} for s in discarded],
        "sample_text": {n: next((s.text for s in samples if s.server == n), "") for n in NAMES},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"bench-{stamp}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nJSON written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
