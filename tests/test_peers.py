"""Boxes on one LAN act as one: real daemons find each other, share models, resume pulls and route requests."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from boards import board_tree
from conftest import Daemon, http, private_state, start_daemon, wait_for
from gguf_factory import gguf_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offgridd.peers.exchange import sign_request
from offgridd.peers.fleet import NodeIdentity, load_identity, save_identity
from offgridd.peers.protocol import _mac, inventory_digest
from offgridd.store import ModelStore, bundle_chunks, file_chunks

INTERVAL = "0.5"


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fleet_state(model_state: Path, root: Path, name: str, key: bytes) -> Path:
    """A state dir holding the built-in model (hard links, no copy) and a node.json with this fleet key."""
    state = private_state(model_state, root / name)
    save_identity(state, NodeIdentity(node_id=secrets.token_hex(16), name=name, fleet_key=key))
    return state


def start_peer(state: Path, udp: int, static: list[int] = (), *args: str, wait: bool = True, port: int | None = None,
               **env: str) -> Daemon:
    full = {"OFFGRID_PEERS_ENABLED": "true", "OFFGRID_PEERS_PORT": str(udp), "OFFGRID_PEERS_INTERVAL": INTERVAL,
            "OFFGRID_PEERS_INTERFACE": "127.0.0.1", "OFFGRID_PEERS_STATIC": ",".join(f"127.0.0.1:{p}" for p in static),
            **env}
    daemon = start_daemon(state, state.parent / f"{state.name}.log", *args, env=full, port=port)
    if wait:
        daemon.wait_ready()  # one at a time: several models loading at once starve two cores
    return daemon


def peers_of(daemon: Daemon) -> dict:
    status, _, body = http("GET", f"{daemon.url}/api/v1/peers")
    assert status == 200
    return json.loads(body)


def peer_names(daemon: Daemon) -> set[str]:
    return {p["name"] for p in peers_of(daemon)["peers"]}



def member_call(daemon: Daemon, key: bytes, method: str, path: str, body: bytes = b"") -> dict[str, str]:
    """Headers of a call a fleet member makes to `daemon` (which tells anyone its node id and start count)."""
    me = peers_of(daemon)["node"]
    host = daemon.url.removeprefix("http://")
    headers, _ = sign_request(key, node=secrets.token_hex(16), boot=1, seq=1, to_node=me["node"], to_boot=me["boot"],
                              method=method, path=path, target=host, body=body)
    return headers


def big_model(path: Path, megabytes: int) -> Path:
    """A valid GGUF of about `megabytes` (tensor data repeated), quick to write."""
    elements = 1 << 18
    path.write_bytes(gguf_bytes(tensors=megabytes, elements=elements))
    return path


def model_names(daemon: Daemon) -> set[str]:
    return {m["id"] for m in json.loads(http("GET", f"{daemon.url}/v1/models")[2])["data"]}


def jobs(daemon: Daemon) -> list[dict]:
    return json.loads(http("GET", f"{daemon.url}/api/v1/jobs")[2])["jobs"]


def stop_all(*daemons: Daemon) -> None:
    for d in daemons:
        d.stop()
    for d in daemons:
        assert not d.blocked_loop_reports(), f"{d.state.name}: the event loop was blocked"


def test_two_boxes_listing_each_other_find_each_other_and_a_stranger_is_ignored(model_state, tmp_path):
    ports = [udp_port() for _ in range(3)]
    state_a = fleet_state(model_state, tmp_path, "box-a", secrets.token_bytes(32))
    state_b = fleet_state(model_state, tmp_path, "box-b", secrets.token_bytes(32))
    # the owner copies box A's key to box B, as the README says
    offgridd = [sys.executable, "-m", "offgridd", "fleet"]
    key = subprocess.run([*offgridd, "key", "--state", str(state_a)], capture_output=True, text=True,
                         check=True).stdout.strip()
    joined = subprocess.run([*offgridd, "join", key, "--state", str(state_b)], capture_output=True, text=True)
    assert joined.returncode == 0 and "joined fleet" in joined.stdout
    assert load_identity(state_b).fleet_key.hex() == key
    a = start_peer(state_a, ports[0], [ports[1], ports[2]])
    b = start_peer(state_b, ports[1], [ports[0], ports[2]])
    stranger = start_peer(fleet_state(model_state, tmp_path, "stranger", secrets.token_bytes(32)), ports[2],
                          [ports[0], ports[1]])
    try:
        wait_for(lambda: peer_names(a) == {"box-b"}, what="A to see B")
        wait_for(lambda: peer_names(b) == {"box-a"}, what="B to see A")
        [seen] = peers_of(b)["peers"]
        assert seen["url"] == a.url and seen["models"] == ["gemma3-270m"]
        assert peers_of(a)["node"]["fleet"] == peers_of(b)["node"]["fleet"] != peers_of(stranger)["node"]["fleet"]
        time.sleep(1.5)  # three announcement intervals: the stranger has been heard, and refused, several times
        assert peer_names(a) == {"box-b"} and peer_names(stranger) == set()
        assert a.metric("offgridd_peer_datagrams_dropped_total", reason="hmac") >= 2
        assert stranger.metric("offgridd_peer_datagrams_dropped_total", reason="hmac") >= 2
        assert a.metric("offgridd_peers") == 1
        status, _, body = http("GET", f"{a.url}/api/v1/status")
        assert " · 1 peer · " in json.loads(body)["line"]
        out = subprocess.run([sys.executable, "-m", "offgridd", "peers", "--url", a.url], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0 and "box-b" in out.stdout and b.url in out.stdout, out
        # the stranger cannot read the inventory or the blobs, even knowing the address
        status, _, body = http("GET", f"{a.url}/fleet/v2/inventory")
        assert status == 403 and json.loads(body)["error"]["code"] == "fleet_key_mismatch"

        b.stop()
        wait_for(lambda: peer_names(a) == set(), timeout=10, what="A to forget B once it is silent")
    finally:
        stop_all(a, b, stranger)


def test_hostile_datagrams_are_dropped_by_reason_and_the_daemon_keeps_serving(model_state, tmp_path):
    key = secrets.token_bytes(32)
    pa, pb = udp_port(), udp_port()
    a = start_peer(fleet_state(model_state, tmp_path, "box-a", key), pa, [pb])
    b = start_peer(fleet_state(model_state, tmp_path, "box-b", key), pb, [pa])
    target = ("127.0.0.1", pa)
    try:
        wait_for(lambda: peer_names(a) == {"box-b"}, what="A to see B")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:

            @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
            @given(st.binary(max_size=3000) | st.builds(msgpack.packb, st.lists(st.binary(max_size=64), max_size=4)))
            def send_garbage(data):
                s.sendto(data, target)

            send_garbage()

            def crafted(version=2, sign_key=key, **changes) -> bytes:
                body = {"node": "12" * 16, "name": "intruder", "port": 1, "ver": "9", "inv": "0" * 16,
                        "models": 0, "load": 0, "queue": 0, "every": 0.5, "boot": 1, "seq": 1, "clock": 0.0,
                        **changes}
                raw = msgpack.packb(body)
                return msgpack.packb([version, raw, _mac(sign_key, raw)])

            # a capture of box B's first announcement, played again by someone on the LAN long after
            replayed = crafted(node=load_identity(b.state).node_id, name="box-b", port=int(b.url.rsplit(":", 1)[1]))
            # signed with the key (a member's) but from a node nobody can reach at that address: never taken
            for data in (crafted(sign_key=bytes(32)), crafted(), replayed, replayed, crafted(version=99),
                         b"\x00" * 2000, b"\xc1\xc1", crafted(port="eighty")):
                s.sendto(data, target)
        wait_for(lambda: a.metric("offgridd_peer_datagrams_dropped_total", reason="unproven") >= 1,
                 what="the crafted datagrams to be counted")
        for why in ("hmac", "unproven", "replay", "version", "oversized", "malformed"):
            assert a.metric("offgridd_peer_datagrams_dropped_total", reason=why) >= 1, why
        assert a.health()[0] == 200
        time.sleep(1.0)
        assert peer_names(a) == {"box-b"}, "the fleet member is still seen, nobody else"
        assert a.proc.poll() is None
    finally:
        stop_all(a, b)


def test_a_model_imported_on_one_box_appears_on_the_other(model_state, tmp_path):
    key = secrets.token_bytes(32)
    pa, pb = udp_port(), udp_port()
    a = start_peer(fleet_state(model_state, tmp_path, "box-a", key), pa, [pb], OFFGRID_PEERS_SYNC="off")
    b = start_peer(fleet_state(model_state, tmp_path, "box-b", key), pb, [pa])
    try:
        wait_for(lambda: peer_names(b) == {"box-a"}, what="B to see A")
        model = big_model(tmp_path / "field-guide.gguf", 4)
        out = subprocess.run([sys.executable, "-m", "offgridd", "models", "import", str(model), "--state",
                              str(a.state), "--name", "field-guide"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        # the job ends after the manifest lands, so wait on the job: then the model is listed too
        wait_for(lambda: any(j["state"] != "running" for j in jobs(b) if j["model"] == "field-guide"),
                 what="the model's pull to end")
        [job] = [j for j in jobs(b) if j["model"] == "field-guide"]
        assert job["kind"] == "peer-pull" and job["state"] == "done" and "box-a" in job["source"]
        assert "field-guide" in model_names(b)
        ok, actual = ModelStore(b.state / "models").verify("field-guide")
        assert ok and actual == ModelStore(a.state / "models").get("field-guide").sha256
        assert not list((b.state / "models" / ".partial").iterdir())
        assert b.metric("offgridd_peer_pull_bytes_total", source="network") == model.stat().st_size
    finally:
        stop_all(a, b)


def test_a_box_with_voice_off_pulls_a_peers_language_models_but_not_its_speech_models(model_state, tmp_path):
    key = secrets.token_bytes(32)
    state_a = fleet_state(model_state, tmp_path, "box-a", key)
    files = {}
    for name in ("voice.onnx", "voice.onnx.json"):  # a speech bundle as the store keeps one; never loaded here
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode() * 4000)
    store_a = ModelStore(state_a / "models")
    store_a.open()
    store_a.import_chunks(bundle_chunks({"kind": "tts", "engine": "piper", "architecture": "vits",
                                         "quantization": "fp32", "language": "en"}, files),
                          name="tiny-voice", kind="tts", source="test")
    store_a.import_chunks(file_chunks(big_model(tmp_path / "field-guide.gguf", 2)), name="field-guide", source="test")
    pa, pb = udp_port(), udp_port()
    a = start_peer(state_a, pa, [pb], OFFGRID_PEERS_SYNC="off")
    b = start_peer(fleet_state(model_state, tmp_path, "box-b", key), pb, [pa], OFFGRID_VOICE_ENABLED="false")
    try:
        wait_for(lambda: any(j["model"] == "field-guide" and j["state"] == "done" for j in jobs(b)),
                 what="the language model's pull")
        time.sleep(3)  # more than a round of the puller: it has seen the speech model and left it
        assert "tiny-voice" not in model_names(b) and not [j for j in jobs(b) if j["model"] == "tiny-voice"]
        assert "not pulling the speech model tiny-voice from box-a: voice is off" in b.log.read_text()
    finally:
        stop_all(a, b)


def upload(daemon: Daemon, collection: str, name: str, data: bytes) -> dict:
    boundary = secrets.token_hex(8)
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="collection"\r\n\r\n{collection}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n').encode() \
        + data + f"\r\n--{boundary}--\r\n".encode()
    status, _, raw = http("POST", f"{daemon.url}/api/v1/documents", body,
                          {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=120)
    assert status == 201, raw
    return json.loads(raw)


def test_a_collection_is_pulled_from_a_peer_verified_and_found_by_search_there(model_state, tmp_path):
    key = secrets.token_bytes(32)
    pa, pb = udp_port(), udp_port()
    a = start_peer(fleet_state(model_state, tmp_path, "box-a", key), pa, [pb])
    b = start_peer(fleet_state(model_state, tmp_path, "box-b", key), pb, [pa],
                   OFFGRID_DOCUMENTS_MAX_UPLOAD_BYTES="2000")
    try:
        water = upload(a, "kit", "water.md", b"# Water\nBoil drinking water for one minute to kill germs.")
        radio = upload(a, "kit", "radio.txt", b"Call on channel 16 for help.\fThe battery lasts two days.")
        upload(a, "kit", "log.txt", b"Day one: the pump was primed and ran well. " * 60)  # 2,580 bytes
        wait_for(lambda: [p.get("collections") for p in peers_of(b)["peers"]] == [
            [{"name": "kit", "documents": 3}]], what="B to see A's collection")
        # not a member: refused, and nothing of the collection is listed
        status, _, raw = http("GET", f"{a.url}/fleet/v2/collections/kit")
        assert status == 403 and b"water" not in raw
        path = f"/fleet/v2/documents/{water['id']}"
        status, _, raw = http("GET", a.url + path, headers=member_call(a, secrets.token_bytes(32), "GET", path))
        assert status == 403 and b"Boil" not in raw

        status, _, raw = http("POST", f"{b.url}/api/v1/documents/pull", {"peer": "box-a", "collection": "kit",
                                                                          "into": "from-a"}, timeout=300)
        report = json.loads(raw)
        assert status == 200 and not report["ok"], report
        assert sorted((d["filename"], d["state"]) for d in report["documents"]) == [
            ("log.txt", "failed"), ("radio.txt", "done"), ("water.md", "done")]
        # a document larger than this box takes as an upload is not fetched at all
        [big] = [d for d in report["documents"] if d["state"] == "failed"]
        assert "at most 2,000 (documents.max_upload_bytes); it was not fetched" in big["reason"]
        status, _, raw = http("GET", f"{b.url}/api/v1/documents/search?collection=from-a&q=channel+for+help")
        top = json.loads(raw)["passages"][0]
        assert (top["filename"], top["page"]) == ("radio.txt", 1)
        listed = json.loads(http("GET", f"{b.url}/api/v1/documents?collection=from-a")[2])["documents"]
        assert {(d["filename"], d["sha256"], d["pages"]) for d in listed} == {
            ("water.md", water["sha256"], 1), ("radio.txt", radio["sha256"], 2)}
        assert sorted(j["state"] for j in jobs(b) if j["kind"] == "peer-document") == ["done", "done", "failed"]
        assert "its vectors kept (the same model)" in b.log.read_text()

        again = json.loads(http("POST", f"{b.url}/api/v1/documents/pull", {"peer": "box-a", "collection": "kit",
                                                                            "into": "from-a"}, timeout=300)[2])
        assert sorted(d["state"] for d in again["documents"]) == ["failed", "skipped", "skipped"]
        status, _, raw = http("POST", f"{b.url}/api/v1/documents/pull", {"peer": "box-z", "collection": "kit"})
        assert status == 404 and json.loads(raw)["error"]["code"] == "peer_not_found"
    finally:
        stop_all(a, b)


def test_a_box_that_syncs_documents_takes_a_peers_new_document_by_itself(model_state, tmp_path):
    key = secrets.token_bytes(32)
    pa, pb = udp_port(), udp_port()
    a = start_peer(fleet_state(model_state, tmp_path, "box-a", key), pa, [pb])
    b = start_peer(fleet_state(model_state, tmp_path, "box-b", key), pb, [pa], OFFGRID_PEERS_SYNC_DOCUMENTS="true")
    try:
        water = upload(a, "kit", "water.md", b"# Water\nBoil drinking water for one minute to kill germs.")
        wait_for(lambda: json.loads(http("GET", f"{b.url}/api/v1/documents?collection=kit")[2])["documents"],
                 what="B to take A's document")
        [kept] = json.loads(http("GET", f"{b.url}/api/v1/documents?collection=kit")[2])["documents"]
        assert (kept["filename"], kept["sha256"]) == ("water.md", water["sha256"])
        [job] = [j for j in jobs(b) if j["kind"] == "peer-document"]
        assert job["state"] == "done" and "signed by box-a" in job["reason"]
        # A, which does not sync documents, takes nothing of B's (B's copy changed B's inventory)
        upload(b, "notes", "radio.txt", b"Call on channel 16 for help.")
        time.sleep(3)
        assert json.loads(http("GET", f"{a.url}/api/v1/documents?collection=notes")[2])["documents"] == []
    finally:
        stop_all(a, b)


def test_a_pull_killed_halfway_resumes_from_where_it_stopped_after_either_side_restarts(model_state, tmp_path):
    key = secrets.token_bytes(32)
    pa, pb = udp_port(), udp_port()
    state_a = fleet_state(model_state, tmp_path, "box-a", key)
    state_b = fleet_state(model_state, tmp_path, "box-b", key)
    model = big_model(tmp_path / "atlas.gguf", 48)
    size = model.stat().st_size
    expected = ModelStore(state_a / "models").import_file(model, name="atlas").sha256
    partial = state_b / "models" / ".partial" / f"sha256-{expected}.part"
    slow = {"OFFGRID_PEERS_BANDWIDTH_LIMIT": str(8 << 20)}  # about 6 s for the whole model

    def partial_size() -> int:
        return partial.stat().st_size if partial.exists() else 0

    a = start_peer(state_a, pa, [pb], OFFGRID_PEERS_SYNC="off")
    b = start_peer(state_b, pb, [pa], wait=False, **slow)
    try:
        wait_for(lambda: partial_size() > size // 4, what="a quarter of the model on B")
        b.proc.send_signal(signal.SIGKILL)  # the receiver loses power
        b.proc.wait()
        kept = partial_size()
        assert size // 4 < kept < size
        b = start_peer(state_b, pb, [pa], wait=False, **slow)  # watched while it loads: the pull starts at once
        wait_for(lambda: partial_size() > kept + size // 8, what="the pull to resume past the first interruption")
        assert b.metric("offgridd_peer_pull_bytes_total", source="partial") == kept
        a.proc.send_signal(signal.SIGKILL)  # now the sender goes away
        a.proc.wait()
        time.sleep(1)
        second = partial_size()
        assert kept < second < size
        a = start_peer(state_a, pa, [pb], OFFGRID_PEERS_SYNC="off")
        wait_for(lambda: "atlas" in model_names(b), timeout=60, what="the model to complete on B")
        ok, actual = ModelStore(state_b / "models").verify("atlas")
        assert ok and actual == expected
        assert not partial.exists()
        network = b.metric("offgridd_peer_pull_bytes_total", source="network")
        assert network == size - kept, "B's second life fetched only what the partial file lacked"
        states = [j["state"] for j in jobs(b) if j["model"] == "atlas"]
        assert states[0] == "done" and "failed" in states  # the sender's death was recorded, then the resume
    finally:
        stop_all(a, b)


def test_a_peer_serving_bad_bytes_is_caught_by_the_hash_and_nothing_is_kept(model_state, tmp_path):
    key = secrets.token_bytes(32)
    pa, pb = udp_port(), udp_port()
    state_a = fleet_state(model_state, tmp_path, "box-a", key)
    manifest = ModelStore(state_a / "models").import_file(big_model(tmp_path / "map.gguf", 2), name="map")
    blob = ModelStore(state_a / "models").path_of(manifest)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:  # the disk of box A rots under one byte
        f.seek(manifest.size // 2)
        byte = f.read(1)
        f.seek(manifest.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    a = start_peer(state_a, pa, [pb], OFFGRID_PEERS_SYNC="off")
    b = start_peer(fleet_state(model_state, tmp_path, "box-b", key), pb, [pa])
    try:
        [job] = wait_for(lambda: [j for j in jobs(b) if j["state"] == "failed"], what="the pull to be refused")
        assert job["model"] == "map" and "sha256 mismatch" in job["reason"]
        assert "map" not in model_names(b)
        assert not list((b.state / "models" / ".partial").iterdir())
        assert not list((b.state / "models" / ".staging").iterdir())
        time.sleep(2)
        assert len([j for j in jobs(b) if j["model"] == "map"]) == 1, "a peer with bad bytes is not asked again soon"
    finally:
        stop_all(a, b)


def test_a_chat_request_for_a_model_only_a_peer_has_is_answered_through_routing(model_state, tmp_path):
    from openai import NotFoundError, OpenAI

    key = secrets.token_bytes(32)
    pa, pb = udp_port(), udp_port()
    state_a = fleet_state(model_state, tmp_path, "box-a", key)
    builtin = json.loads((state_a / "models" / "manifests" / "gemma3-270m.json").read_text())
    (state_a / "models" / "manifests" / "tutor.json").write_text(json.dumps({**builtin, "name": "tutor"}))
    a = start_peer(state_a, pa, [pb], OFFGRID_PEERS_SYNC="off")
    b = start_peer(fleet_state(model_state, tmp_path, "box-b", key), pb, [pa], OFFGRID_PEERS_SYNC="off",
                   OFFGRID_QUEUE_DEPTH="0", OFFGRID_PARALLEL="1")
    try:
        wait_for(lambda: any("tutor" in p["models"] for p in peers_of(b)["peers"]), what="B to know A's models")
        node_a = load_identity(state_a).node_id
        node_b = load_identity(b.state).node_id
        client = OpenAI(base_url=f"{b.url}/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "Name a river."}]

        raw = client.chat.completions.with_raw_response.create(model="tutor", messages=messages, max_tokens=8,
                                                               temperature=0)
        assert raw.headers["x-offgrid-node"] == node_a and raw.headers["x-offgrid-routed-via"] == node_b
        assert raw.parse().choices[0].message.content

        with client.chat.completions.with_streaming_response.create(
                model="tutor", messages=messages, max_tokens=8, temperature=0, stream=True) as resp:
            assert resp.headers["x-offgrid-node"] == node_a
            assert resp.headers["content-type"].startswith("text/event-stream")
            chunks = list(resp.parse())
        assert len(chunks) >= 3 and chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

        local = client.chat.completions.with_raw_response.create(model="gemma3-270m", messages=messages,
                                                                 max_tokens=4)
        assert local.headers["x-offgrid-node"] == node_b
        with pytest.raises(NotFoundError):
            client.chat.completions.create(model="nobody-has-this", messages=messages, max_tokens=4)
        assert b.metric("offgridd_requests_routed_total", peer="box-a") == 2

        # B runs one request at a time with no queue: while it is busy (counting on to 300 tokens), the next goes to A
        with client.completions.with_streaming_response.create(
                model="gemma3-270m", prompt="1, 2, 3, 4, 5,", max_tokens=300, temperature=0, stream=True) as busy:
            assert busy.headers["x-offgrid-node"] == node_b
            next(iter(busy.parse()))
            overflow = client.chat.completions.with_raw_response.create(model="gemma3-270m", messages=messages,
                                                                        max_tokens=4)
            assert overflow.headers["x-offgrid-node"] == node_a
        assert b.metric("offgridd_admission_rejected_total", reason="queue_full") >= 1
        # A request routed once is never routed again: A answers 404 itself rather than bounce it back
        body = json.dumps({"model": "nobody-has-this", "messages": messages}).encode()
        status, _, _ = http("POST", f"{a.url}/v1/chat/completions", body, headers={
            "X-Offgrid-Hop": node_b, "Content-Type": "application/json",
            **member_call(a, key, "POST", "/v1/chat/completions", body)})
        assert status == 404
        # and the hop header alone, without a member's signature for this call, is refused
        status, _, _ = http("POST", f"{a.url}/v1/chat/completions", body, headers={
            "X-Offgrid-Hop": node_b, "Content-Type": "application/json"})
        assert status == 403
    finally:
        stop_all(a, b)


def test_a_box_without_memory_for_the_model_passes_requests_to_a_peer_that_has_room(model_state, tmp_path):
    key = secrets.token_bytes(32)
    pa, pb = udp_port(), udp_port()
    a = start_peer(fleet_state(model_state, tmp_path, "box-a", key), pa, [pb], OFFGRID_PEERS_SYNC="off")
    tight = board_tree(tmp_path / "root-b", "pi4-2gb", available_fraction=0.1)  # ~185 MB free: nothing fits
    b = start_peer(fleet_state(model_state, tmp_path, "box-b", key), pb, [pa], wait=False,
                   OFFGRID_PEERS_SYNC="off", OFFGRID_HARDWARE_ROOT=str(tight))
    try:
        wait_for(lambda: b.health()[1]["status"] == "unavailable", what="B to find no model fits")
        # a peer is listed as soon as it is heard; its models once its inventory is fetched, which routing needs
        wait_for(lambda: [p["models"] for p in peers_of(b)["peers"]] == [["gemma3-270m"]], what="B to see A's model")
        status, headers, body = http("POST", f"{b.url}/v1/completions",
                                     {"model": "gemma3-270m", "prompt": "The sea is", "max_tokens": 4})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] > 0
        assert headers["X-Offgrid-Node"] == load_identity(a.state).node_id
    finally:
        stop_all(a, b)


def _loopback_multicast_works() -> bool:
    group, port = "239.255.77.77", udp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        try:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            rx.bind(("", port))
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                          socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            tx.sendto(b"ping", (group, port))
            rx.settimeout(1)
            return rx.recv(16) == b"ping"
        except OSError:
            return False


def test_boxes_find_each_other_by_multicast_with_no_addresses_configured(model_state, tmp_path):
    if not _loopback_multicast_works():
        pytest.skip("multicast on the loopback interface does not work on this machine")
    key = secrets.token_bytes(32)
    port = udp_port()
    group = f"239.255.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
    a = start_peer(fleet_state(model_state, tmp_path, "box-a", key), port, OFFGRID_PEERS_GROUP=group)
    b = start_peer(fleet_state(model_state, tmp_path, "box-b", key), port, OFFGRID_PEERS_GROUP=group)
    try:
        wait_for(lambda: peer_names(a) == {"box-b"}, what="A to see B")
        wait_for(lambda: peer_names(b) == {"box-a"}, what="B to see A")
        assert peers_of(a)["node"]["multicast"] == f"{group}:{port}"
    finally:
        stop_all(a, b)


@pytest.fixture
def network_namespace():
    """A namespace joined to this one by a veth pair: 10.231.x.1 here, 10.231.x.2 there."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    tag = secrets.token_hex(3)
    ns, here, there = f"ogd-{tag}", f"ogh{tag}", f"ogt{tag}"
    net = f"10.231.{secrets.randbelow(250) + 1}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    try:
        ip("netns", "add", ns)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create a network namespace here: {e.stderr.decode().strip()}")
    try:
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", ns)
        ip("addr", "add", f"{net}.1/24", "dev", here)
        ip("link", "set", here, "up")
        ip("-n", ns, "addr", "add", f"{net}.2/24", "dev", there)
        ip("-n", ns, "link", "set", there, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", there)  # as a LAN's default route would carry it
        yield ns, f"{net}.1", f"{net}.2"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_boxes_on_two_network_stacks_joined_by_a_cable_find_each_other_by_multicast(model_state, tmp_path,
                                                                                   network_namespace):
    ns, here, there = network_namespace
    key = secrets.token_bytes(32)
    port, http_port = udp_port(), 11611 + secrets.randbelow(1000)
    group = f"239.255.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
    state_a = fleet_state(model_state, tmp_path, "box-a", key)
    (state_a / "none.toml").write_text("")
    env = {**os.environ, "OFFGRID_CONFIG": str(state_a / "none.toml"), "PYTHONASYNCIODEBUG": "1",
           "OFFGRID_PEERS_PORT": str(port), "OFFGRID_PEERS_GROUP": group, "OFFGRID_PEERS_INTERVAL": INTERVAL}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "offgridd", "serve", "--host", there, "--port",
         str(http_port), "--state", str(state_a), "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "box-a.log", "wb"), env=env)
    a = Daemon(proc=proc, url=f"http://{there}:{http_port}", state=state_a, log=tmp_path / "box-a.log")
    b = start_peer(fleet_state(model_state, tmp_path, "box-b", key), port, [], "--host", "0.0.0.0",
                   OFFGRID_PEERS_GROUP=group, OFFGRID_PEERS_INTERFACE=here)
    try:
        wait_for(lambda: peer_names(b) == {"box-a"}, what="B to see A across the cable")
        wait_for(lambda: peer_names(a) == {"box-b"}, what="A to see B across the cable")
        [seen] = peers_of(b)["peers"]
        assert seen["address"] == there
        [seen] = peers_of(a)["peers"]
        assert seen["address"] == here
    finally:
        stop_all(a, b)


def test_inventory_digest_changes_with_the_store():
    one = inventory_digest([("a", "1" * 64)])
    assert one == inventory_digest([("a", "1" * 64)]) != inventory_digest([("a", "2" * 64)])
    assert inventory_digest([("a", "1" * 64), ("b", "2" * 64)]) == inventory_digest([("b", "2" * 64), ("a", "1" * 64)])


def _partials(state: Path, builtin_sha: str) -> dict[str, Path]:
    folder = state / "models" / ".partial"
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"arrived": folder / f"sha256-{builtin_sha}.part", "abandoned": folder / f"sha256-{'a' * 64}.part",
             "fresh": folder / f"sha256-{'b' * 64}.part"}
    for part in parts.values():
        part.write_bytes(b"GGUF" + bytes(4096))
    week_ago = time.time() - 8 * 86400
    os.utime(parts["abandoned"], (week_ago, week_ago))
    return parts


@pytest.mark.parametrize("sync", ["pull", "off"])
def test_partial_pulls_that_can_no_longer_help_are_deleted_at_start(model_state, tmp_path, sync):
    state = fleet_state(model_state, tmp_path, "a", secrets.token_bytes(32))
    builtin = ModelStore(state / "models").get("gemma3-270m").sha256
    parts = _partials(state, builtin)
    daemon = start_peer(state, udp_port(), OFFGRID_PEERS_SYNC=sync)
    try:
        # the model arrived another way, or nothing was added for a week: gone; a recent pull waits for its peer
        wait_for(lambda: not parts["arrived"].exists() and not parts["abandoned"].exists(),
                 what="the stale partial pulls to be deleted")
        assert parts["fresh"].exists() == (sync == "pull"), "with pulling off no partial pull is kept"
        assert daemon.health()[0] == 200
    finally:
        stop_all(daemon)
