#!/usr/bin/env python3
"""Peer sync throughput against a plain HTTP download of the same file over the same link, and discovery time.

    .venv/bin/python bench/peer_sync.py --runs 3 [--rate 1gbit] [--no-veth]

Box A serves the built-in model under a second name; box B (sync = "pull") lacks that name and pulls it: 250 MB over
the network, hashed, verified, fsynced and committed by the store. The baseline is curl fetching the same blob from
the same endpoint of box A to a file (no hashing), timed without and with an fsync after. Runs alternate (curl, pull,
curl, pull, ...). Links: loopback, and (as root, with iproute2) a veth pair into a network namespace shaped with tc to
--rate, a LAN's speed; there the boxes find each other by multicast. Discovery is the time from B's API answering
to each box listing the other.
Results: a markdown table on stdout, JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

from offgridd.peers.exchange import BLOB_PATH, sign_request  # noqa: E402
from offgridd.peers.fleet import NodeIdentity, save_identity  # noqa: E402
from offgridd.store import ModelStore, register_builtin  # noqa: E402

NAME = "gemma-bench"


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def wait(what: str, check, timeout: float = 120, step: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := check():
                return value
        except OSError:
            pass
        time.sleep(step)
    raise TimeoutError(what)


def make_state(path: Path, source: Path | None, name: str, key: bytes, extra_manifest: bool) -> Path:
    """A state dir; B's blobs are hard links to A's, so only the bench model's *name* is missing there."""
    store = ModelStore(path / "models")
    store.open()
    if source is None:
        register_builtin(store)
    else:
        for blob in (source / "models" / "blobs").iterdir():
            os.link(blob, store.blobs / blob.name)
        shutil.copy(source / "models" / "manifests" / "gemma3-270m.json", store.manifests)
    if extra_manifest:
        manifest = json.loads((store.manifests / "gemma3-270m.json").read_text())
        (store.manifests / f"{NAME}.json").write_text(json.dumps({**manifest, "name": NAME}))
    save_identity(path, NodeIdentity(node_id=secrets.token_hex(16), name=name, fleet_key=key))
    (path / "none.toml").write_text("")
    return path


@contextmanager
def daemon(state: Path, host: str, port: int, env: dict, netns: str | None = None):
    cmd = [
        sys.executable,
        "-m",
        "offgridd",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--state",
        str(state),
        "--threads",
        "1",
        "--model",
        "none-loaded",
    ]  # no model to load: the bench measures the network side
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    full = {**os.environ, "OFFGRID_CONFIG": str(state / "none.toml"), "OFFGRID_PEERS_ENABLED": "true", **env}
    full.pop("NOTIFY_SOCKET", None)
    log = open(state / "daemon.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, env=full)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def peers(url: str) -> set[str]:
    return {p["name"] for p in get_json(f"{url}/api/v1/peers")["peers"]}


def pull_jobs(url: str) -> list[dict]:
    return [j for j in get_json(f"{url}/api/v1/jobs")["jobs"] if j["model"] == NAME and j["state"] != "running"]


def curl(url: str, identity: NodeIdentity, sha: str, out: Path) -> tuple[float, float]:
    """Seconds for curl to fetch the blob to a file, and seconds more to fsync it (a pull's data is durable)."""
    path = f"{BLOB_PATH}{sha}"
    me = get_json(f"{url}/api/v1/peers")["node"]  # a call is signed for the callee's node and current start
    headers, _ = sign_request(identity.fleet_key, node=secrets.token_hex(16), boot=1, seq=1, to_node=me["node"],
                              to_boot=me["boot"], method="GET", path=path, target=url.removeprefix("http://"))
    [(header, value)] = headers.items()
    res = subprocess.run(
        ["curl", "-sS", "--fail", "-o", str(out), "-H", f"{header}: {value}", "-w", "%{time_total}", url + path],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    started = time.monotonic()
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    synced = time.monotonic() - started
    out.unlink()
    return float(res.stdout), synced


def measure_link(
    label: str,
    a_url: str,
    b_url: str,
    identity_b: NodeIdentity,
    sha: str,
    size: int,
    runs: int,
    scratch: Path,
    discovery: dict,
) -> dict:
    plain, durable, synced = [], [], []
    curl(a_url, identity_b, sha, scratch / "plain.bin")  # warm-up: B's first pull already happened at discovery
    for _ in range(runs):
        fetch, fsync = curl(a_url, identity_b, sha, scratch / "plain.bin")
        plain.append(size / fetch)
        durable.append(size / (fetch + fsync))
        done = len(pull_jobs(b_url))
        req = urllib.request.Request(f"{b_url}/api/v1/models/{NAME}", method="DELETE")
        if NAME in {m["name"] for m in get_json(f"{b_url}/api/v1/models")["models"]}:
            urllib.request.urlopen(req, timeout=10).read()
        job = wait("the pull", lambda done=done: len(pull_jobs(b_url)) > done and pull_jobs(b_url)[0], step=0.05)
        assert job["state"] == "done", job
        synced.append(job["bytes_done"] / (job["finished"] - job["started"]))
    p, s = statistics.median(plain), statistics.median(synced)
    return {
        "link": label,
        "bytes": size,
        "plain_MBps": [round(x / 1e6, 1) for x in plain],
        "plain_fsync_MBps": [round(x / 1e6, 1) for x in durable],
        "sync_MBps": [round(x / 1e6, 1) for x in synced],
        "ratio": round(s / p, 3),
        "ratio_to_plain_fsync": round(s / statistics.median(durable), 3),
        **discovery,
    }


def discover(a_url: str, b_url: str, start_b) -> tuple[dict, object]:
    """Start B; time from its API answering until it lists A, and until A lists it."""
    ctx = start_b()
    ctx.__enter__()
    wait("B's API", lambda: get_json(f"{b_url}/api/v1/peers") is not None)
    t0 = time.monotonic()
    wait("B to see A", lambda: peers(b_url))
    b_sees = time.monotonic() - t0
    wait("A to see B", lambda: peers(a_url))
    a_sees = time.monotonic() - t0
    return {"discovery_b_sees_a_s": round(b_sees, 3), "discovery_a_sees_b_s": round(a_sees, 3)}, ctx


@contextmanager
def veth(rate: str):
    tag = secrets.token_hex(3)
    ns, here, there, net = f"ogb-{tag}", f"obh{tag}", f"obt{tag}", f"10.232.{secrets.randbelow(250) + 1}"
    cmds = [
        ["netns", "add", ns],
        ["link", "add", here, "type", "veth", "peer", "name", there],
        ["link", "set", there, "netns", ns],
        ["addr", "add", f"{net}.1/24", "dev", here],
        ["link", "set", here, "up"],
        ["-n", ns, "addr", "add", f"{net}.2/24", "dev", there],
        ["-n", ns, "link", "set", there, "up"],
        ["-n", ns, "link", "set", "lo", "up"],
        ["-n", ns, "route", "add", "224.0.0.0/4", "dev", there],
    ]
    try:
        for c in cmds:
            subprocess.run(["ip", *c], check=True, capture_output=True)
        for dev, prefix in ((here, []), (there, ["ip", "netns", "exec", ns])):  # both directions at the LAN's rate
            subprocess.run(
                [
                    *prefix,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    "256kb",
                    "latency",
                    "20ms",
                ],
                check=True,
                capture_output=True,
            )
        yield ns, f"{net}.1", f"{net}.2"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", default="1gbit", help="tc rate of the veth link (a LAN's speed)")
    parser.add_argument("--no-veth", action="store_true", help="loopback only")
    parser.add_argument("--keep", action="store_true", help="keep the state dirs and daemon logs")
    args = parser.parse_args()

    work = BENCH_DIR / ".build" / f"peers-{os.getpid()}"
    key = secrets.token_bytes(32)
    results = []
    try:
        state_a = make_state(work / "a", None, "box-a", key, extra_manifest=True)
        manifest = ModelStore(state_a / "models").get(NAME)
        sha, size = manifest.sha256, manifest.size

        # loopback, static addresses
        ua, ub = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
        pa, pb = free_port(), free_port()
        state_b = make_state(work / "b", state_a, "box-b", key, extra_manifest=False)
        identity_b = NodeIdentity(node_id=secrets.token_hex(16), name="bench", fleet_key=key)
        env = {"OFFGRID_PEERS_INTERFACE": "127.0.0.1"}
        a_url, b_url = f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"
        with ExitStack() as stack:
            stack.enter_context(
                daemon(
                    state_a,
                    "127.0.0.1",
                    pa,
                    {
                        **env,
                        "OFFGRID_PEERS_PORT": str(ua),
                        "OFFGRID_PEERS_STATIC": f"127.0.0.1:{ub}",
                        "OFFGRID_PEERS_SYNC": "off",
                    },
                )
            )
            wait("A's API", lambda: get_json(f"{a_url}/api/v1/peers"))
            found, ctx = discover(
                a_url,
                b_url,
                lambda: daemon(
                    state_b,
                    "127.0.0.1",
                    pb,
                    {**env, "OFFGRID_PEERS_PORT": str(ub), "OFFGRID_PEERS_STATIC": f"127.0.0.1:{ua}"},
                ),
            )
            stack.push(lambda *exc: ctx.__exit__(*exc))
            results.append(
                measure_link("loopback (static peers)", a_url, b_url, identity_b, sha, size, args.runs, work, found)
            )

        if not args.no_veth and os.geteuid() == 0 and shutil.which("tc"):
            shutil.move(work / "b", work / "b-loopback")
            state_b = make_state(work / "b", state_a, "box-b", key, extra_manifest=False)
            port = free_port(socket.SOCK_DGRAM)
            with veth(args.rate) as (ns, here, there), ExitStack() as stack:
                a_url, b_url = f"http://{there}:{pa}", f"http://127.0.0.1:{pb}"
                stack.enter_context(
                    daemon(state_a, there, pa, {"OFFGRID_PEERS_PORT": str(port), "OFFGRID_PEERS_SYNC": "off"}, netns=ns)
                )
                wait("A's API", lambda: get_json(f"{a_url}/api/v1/peers"))
                found, ctx = discover(
                    a_url,
                    b_url,
                    lambda: daemon(
                        state_b, "0.0.0.0", pb, {"OFFGRID_PEERS_PORT": str(port), "OFFGRID_PEERS_INTERFACE": here}
                    ),
                )
                stack.push(lambda *exc: ctx.__exit__(*exc))
                results.append(
                    measure_link(
                        f"veth at {args.rate} (multicast)", a_url, b_url, identity_b, sha, size, args.runs, work, found
                    )
                )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"model {size / 1e6:.0f} MB, {args.runs} runs each, medians\n")
    print(
        "| link | curl MB/s | curl + fsync MB/s | peer sync MB/s | sync / curl | sync / (curl + fsync) "
        "| discovery B→A | discovery A→B |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        plain, durable = statistics.median(r["plain_MBps"]), statistics.median(r["plain_fsync_MBps"])
        print(
            f"| {r['link']} | {plain:.0f} | {durable:.0f} | {statistics.median(r['sync_MBps']):.0f} | "
            f"{r['ratio']:.2f} | {r['ratio_to_plain_fsync']:.2f} | {r['discovery_b_sees_a_s'] * 1000:.0f} ms | "
            f"{r['discovery_a_sees_b_s'] * 1000:.0f} ms |"
        )
    out = BENCH_DIR / "results" / f"peer_sync-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"runs": args.runs, "results": results}, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
