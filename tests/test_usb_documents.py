"""Documents on USB sticks: a stick's documents/ folder is imported into the box's collections by the running daemon,
its own model embedding them, one job per file; bad files are refused one by one, and a stick plugged again adds
nothing twice."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import pytest
from conftest import free_port, http, private_state, running_daemon, start_daemon, wait_for
from documents_bench import pdf_of
from gguf_factory import gguf_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from usb_images import entry, ext4_stick, fat_stick, put, write_manifest

from offgridd.documents.extract import SUFFIXES
from offgridd.documents.records import check_collection
from offgridd.usb.documents import _junk, read_document, read_documents
from offgridd.usb.writer import StickWriteError, write_documents

TINY = gguf_bytes(arch="llama", tensors=2, elements=4096)
MAX_BYTES = 20_000  # the module's daemon takes documents of at most this many bytes
PUMP = ("# The hand pump\n\nTo prime the hand pump, pour one cup of clean water into the top and work the handle "
        "twenty times. The seal is replaced every two years.\n")
SPRING = ("Field notes, week 32. The spring below the north ridge dries up in late August; carry two extra litres "
          "of water on that walk.\n")
RADIO = ["The hand-crank radio receives AM, FM and the weather band. Keep it dry.",
         "To charge the battery of the hand-crank radio, turn the crank for three minutes: that gives about twenty "
         "minutes of listening."]



@pytest.fixture(scope="module")
def box(model_state, tmp_path_factory):
    """One daemon for the module, watching its own stick roots."""
    where = tmp_path_factory.mktemp("usb-documents")
    roots = where / "usb-root"
    roots.mkdir()
    with running_daemon(private_state(model_state, where / "state"), where / "daemon.log",
                        env={"OFFGRID_USB_ROOTS": str(roots), "OFFGRID_USB_POLL_SECONDS": "0.3",
                             "OFFGRID_DOCUMENTS_MAX_UPLOAD_BYTES": str(MAX_BYTES)}) as daemon:
        daemon.roots = roots
        yield daemon


def get(daemon, path: str):
    status, _, body = http("GET", f"{daemon.url}{path}")
    assert status == 200, body
    return json.loads(body)


def imported(daemon, mount: Path) -> dict:
    """The watch's summary once it has finished with the stick at `mount`."""
    def finished():
        usb = get(daemon, "/api/v1/usb")
        return usb["importing"] is None and (usb["last"] or {}).get("root") == str(mount) and usb["last"]
    return wait_for(finished, timeout=180, what=f"the import from {mount}")


def jobs_from(daemon, mount: Path) -> list[dict]:
    """The jobs of the stick at `mount`, in the order they started."""
    jobs = [j for j in get(daemon, "/api/v1/jobs")["jobs"] if j["source"].startswith(f"usb:{mount}")]
    return sorted(jobs, key=lambda j: j["started"])


def search(daemon, collection: str, q: str) -> list[dict]:
    query = urllib.parse.urlencode({"collection": collection, "q": q})
    return get(daemon, f"/api/v1/documents/search?{query}")["passages"]


def test_a_stick_s_documents_go_into_their_collections_after_its_models_and_bad_files_are_refused_one_by_one(
        box, tmp_path):
    src = tmp_path / "src"
    put(src, "OFFGRID/models/tiny.gguf", TINY)
    write_manifest(src, [entry("tiny", "OFFGRID/models/tiny.gguf", TINY)])
    put(src, "documents/manual.md", PUMP.encode())
    put(src, "documents/field-notes/notes.txt", SPRING.encode())
    put(src, "documents/field-notes/radio.pdf", pdf_of(RADIO))
    put(src, "documents/huge.txt", b"word " * (MAX_BYTES // 5 + 1))
    put(src, "documents/photo.png", b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    put(src, "documents/fake.pdf", os.urandom(512))  # named as a PDF, a binary inside
    put(src, "documents/.DS_Store", b"\x00\x00\x00\x01Bud1")  # what a Mac leaves: ignored, no job
    put(src, "documents/._manual.md", b"\x00\x05\x16\x07")
    os.symlink("/etc/passwd", src / "documents" / "passwd.txt")
    put(src, "documents/field-notes/old/2019.txt", b"a folder two levels down")
    put(src, "documents/bad:name/x.txt", b"a folder whose name is no collection's")
    with ext4_stick(src, box.roots / "sdx1") as mount:
        last = imported(box, mount)
        jobs = jobs_from(box, mount)
    assert last["imported"] == ["tiny"] and last["refused"] == ""
    assert sorted(last["documents"]) == ["default/manual.md", "field-notes/notes.txt", "field-notes/radio.pdf"]
    assert jobs[0]["kind"] == "usb-import" and jobs[0]["model"] == "tiny" and jobs[0]["state"] == "done"
    documents = {j["source"].removeprefix(f"usb:{mount}/"): j for j in jobs[1:]}
    assert all(j["kind"] == "usb-document" for j in documents.values())
    assert sorted(documents) == sorted([
        "documents/manual.md", "documents/field-notes/notes.txt", "documents/field-notes/radio.pdf",
        "documents/huge.txt", "documents/photo.png", "documents/fake.pdf", "documents/passwd.txt",
        "documents/field-notes/old", "documents/bad:name"])  # nothing for the .DS_Store or the ._ file
    for file in ("manual.md", "field-notes/notes.txt", "field-notes/radio.pdf"):
        job = documents[f"documents/{file}"]
        assert (job["state"], job["model"]) == ("done", file.rsplit("/", 1)[-1]), job
        assert job["bytes_done"] == job["bytes_total"] == (src / "documents" / file).stat().st_size
    assert "as document" in documents["documents/field-notes/radio.pdf"]["reason"]
    assert "pdf, 2 page(s)" in documents["documents/field-notes/radio.pdf"]["reason"]
    refused = {file: j["reason"] for file, j in documents.items() if j["state"] != "done"}
    assert all(j["state"] == "failed" for j in documents.values() if j["state"] != "done")
    assert "max_upload_bytes" in refused["documents/huge.txt"] and "not read" in refused["documents/huge.txt"]
    assert "not '.png' files" in refused["documents/photo.png"]
    assert "is named as a PDF but is not one" in refused["documents/fake.pdf"]
    assert "symlink" in refused["documents/passwd.txt"] and "not followed" in refused["documents/passwd.txt"]
    assert "one level deep" in refused["documents/field-notes/old"]
    assert "collection's name is 1 to 64" in refused["documents/bad:name"]

    listed = get(box, "/api/v1/documents")
    assert {(d["collection"], d["filename"]) for d in listed["documents"]} == {
        ("default", "manual.md"), ("field-notes", "notes.txt"), ("field-notes", "radio.pdf")}
    assert search(box, "default", "how do I prime the hand pump")[0]["filename"] == "manual.md"
    top = search(box, "field-notes", "how long to turn the crank to charge the radio battery")[0]
    assert (top["filename"], top["page"]) == ("radio.pdf", 2)
    assert "north ridge" in search(box, "field-notes", "where does the spring dry up")[0]["text"]

    # plugged in again (into another port: the watch's summary of the first one cannot be mistaken for this one's):
    # everything is there already, nothing is added twice
    with ext4_stick(src, box.roots / "sdy1") as mount:
        again = imported(box, mount)
        skipped = {j["source"].removeprefix(f"usb:{mount}/"): j for j in jobs_from(box, mount)
                   if j["state"] == "skipped"}
        # a person's import request answers with every result, models and documents, each with its job
        status, _, body = http("POST", f"{box.url}/api/v1/usb/import", {"path": str(mount)}, timeout=300)
    assert again["documents"] == [] and again["imported"] == []
    assert {"documents/manual.md", "documents/field-notes/notes.txt",
            "documents/field-notes/radio.pdf"} <= set(skipped)
    assert "already in collection 'field-notes'" in skipped["documents/field-notes/notes.txt"]["reason"]
    assert len(get(box, "/api/v1/documents")["documents"]) == 3
    report = json.loads(body)
    assert status == 200 and report["ok"] is False  # the refused files are still refused
    results = {(r["kind"], r["file"]): r for r in report["results"]}
    assert results[("model", "OFFGRID/models/tiny.gguf")]["state"] == "skipped"
    manual = results[("document", "documents/manual.md")]
    assert (manual["state"], manual["name"], manual["collection"]) == ("skipped", "manual.md", "default")
    assert manual["job"] and "already in collection 'default'" in manual["reason"]
    assert results[("document", "documents/photo.png")]["state"] == "failed"


def test_a_stick_with_only_documents_plugged_in_while_the_box_starts_is_imported_once_the_model_is_ready(
        model_state, tmp_path):
    src = tmp_path / "src"
    put(src, "documents/water.html", b"<!doctype html><html><head><title>Water</title><script>x()</script></head>"
                                     b"<body><h1>Water</h1><p>Boil water for one full minute before drinking it."
                                     b"</p></body></html>")
    roots = tmp_path / "usb-root"
    with fat_stick(src, roots / "sdw1") as mount:  # FAT, through fusefat, as most sticks are
        with running_daemon(private_state(model_state, tmp_path / "state"), tmp_path / "daemon.log",
                            env={"OFFGRID_USB_ROOTS": str(roots), "OFFGRID_USB_POLL_SECONDS": "0.3"}) as daemon:
            last = imported(daemon, mount)
            [job] = jobs_from(daemon, mount)
            passages = search(daemon, "default", "how long should I boil water")
    assert last["refused"] == "" and last["ok"] is True and last["documents"] == ["default/water.html"]
    assert (job["kind"], job["model"], job["state"]) == ("usb-document", "water.html", "done")
    assert job["source"] == f"usb:{mount}/documents/water.html"
    assert passages and passages[0]["filename"] == "water.html" and "x()" not in passages[0]["text"]


def test_a_daemon_stopped_while_a_stick_s_documents_import_ends_every_job_with_a_reason_and_keeps_whole_documents(
        model_state, tmp_path):
    src = tmp_path / "src"
    for i in range(40):  # enough that the daemon is still at it when it is told to stop, however fast it embeds
        put(src, f"documents/log-{i}.txt", (f"Logbook {i}: " + SPRING * 4).encode())
    roots = tmp_path / "usb-root"
    roots.mkdir()
    daemon = start_daemon(private_state(model_state, tmp_path / "state"), tmp_path / "daemon.log",
                          env={"OFFGRID_USB_ROOTS": str(roots), "OFFGRID_USB_POLL_SECONDS": "0.3",
                               "OFFGRID_DRAIN_SECONDS": "1"})
    try:
        daemon.wait_ready()
        with ext4_stick(src, roots / "sdv1") as mount:
            wait_for(lambda: any(j["state"] == "done" for j in jobs_from(daemon, mount)), timeout=120,
                     what="the first document")
            assert daemon.stop() == 0
    finally:
        daemon.stop()
    assert daemon.blocked_loop_reports() == []
    db = sqlite3.connect(daemon.state / "offgridd.db")
    jobs = dict(db.execute("SELECT model, state || ': ' || reason FROM jobs WHERE kind = 'usb-document'"))
    kept = {name for (name,) in db.execute("SELECT filename FROM documents")}
    orphans = db.execute("SELECT count(*) FROM chunks WHERE document_id NOT IN (SELECT id FROM documents)").fetchone()
    db.close()
    assert set(jobs) == {f"log-{i}.txt" for i in range(40)}, "every document has its job, ended"
    done = {name for name, result in jobs.items() if result.startswith("done")}
    assert done and kept == done and orphans == (0,)
    stopped = [result for result in jobs.values() if not result.startswith("done")]
    assert stopped and all(r.startswith("failed") and ("stopping" in r or "shutting down" in r) for r in stopped)


def test_usb_import_without_a_daemon_imports_the_models_and_says_the_documents_need_it(tmp_path):
    src = tmp_path / "src"
    put(src, "documents/manual.md", PUMP.encode())
    put(src, "documents/photo.png", b"\x89PNG\r\n\x1a\n")
    env = {**os.environ, "OFFGRID_CONFIG": "/dev/null", "OFFGRID_PORT": str(free_port())}  # no daemon answers
    with ext4_stick(src, tmp_path / "img") as mount:
        done = subprocess.run([sys.executable, "-m", "offgridd", "usb", "import", str(mount), "--json", "--local",
                               "--state", str(tmp_path / "box")], capture_output=True, text=True, env=env,
                              timeout=120)
    report = json.loads(done.stdout)
    assert report["refused"] == "", "a stick with only documents is not 'no models'"
    assert [(r["kind"], r["file"], r["state"]) for r in report["results"]] == [
        ("document", "documents/photo.png", "failed"), ("document", "documents", "skipped")]
    assert "running daemon" in report["results"][1]["reason"] and "1 document(s)" in report["results"][1]["reason"]
    assert done.returncode == 1  # the refused photo


def test_a_stick_without_models_or_documents_is_still_refused_and_says_where_documents_go(tmp_path):
    src = tmp_path / "src"
    put(src, "Documents/manual.md", PUMP.encode())
    env = {**os.environ, "OFFGRID_CONFIG": "/dev/null", "OFFGRID_PORT": str(free_port())}
    with ext4_stick(src, tmp_path / "img") as mount:
        done = subprocess.run([sys.executable, "-m", "offgridd", "usb", "import", str(mount), "--local",
                               "--state", str(tmp_path / "box")], capture_output=True, text=True, env=env,
                              timeout=120)
    assert done.returncode == 1 and "no models on" in done.stderr
    assert "'Documents' is not read: documents go in documents/, in lower case" in done.stderr


def test_documents_written_onto_a_stick_on_a_pc_are_listed_in_their_collection(tmp_path):
    pc = tmp_path / "pc"
    put(pc, "manual.md", PUMP.encode())
    put(pc, "notes.txt", SPRING.encode())
    put(pc, "photo.png", b"\x89PNG\r\n\x1a\n")
    with ext4_stick(tmp_path / "empty", tmp_path / "img", writable=True) as mount:
        with pytest.raises(StickWriteError, match="not '.png' files"):
            write_documents(mount, [pc / "manual.md", pc / "photo.png"], "kit")
        with pytest.raises(StickWriteError, match="collection's name"):
            write_documents(mount, [pc / "manual.md"], "../kit")
        assert not (mount / "documents").exists()  # refused before anything was written
        assert write_documents(mount, [pc / "manual.md", pc / "notes.txt"], "kit") == [
            "documents/kit/manual.md", "documents/kit/notes.txt"]
        assert write_documents(mount, [pc / "notes.txt"]) == ["documents/notes.txt"]
        listing = read_documents(mount)
        assert not list(mount.rglob("*.partial"))
    assert listing.refused == []
    assert [(d.collection, d.file) for d in listing.documents] == [
        ("kit", "documents/kit/manual.md"), ("kit", "documents/kit/notes.txt"), ("default", "documents/notes.txt")]


NAMES = st.one_of(
    st.sampled_from(["manual.md", "notes.txt", "a.pdf", "photo.PNG", ".DS_Store", "._manual.md", "Thumbs.db", "README",
                     "bad:name", "field notes", "notes.txt~", "default", "..x", "a.b.HTML", "bad\udcff.txt", "x."]),
    st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=16)
    .filter(lambda n: n not in (".", "..")))
TREES = st.recursive(
    st.one_of(st.binary(max_size=64).map(lambda b: ("file", b)), st.just(("fifo",)),
              st.sampled_from(["/etc/passwd", "/", "..", "manual.md", "../OFFGRID"]).map(lambda t: ("link", t))),
    lambda inner: st.dictionaries(NAMES, inner, max_size=5).map(lambda d: ("dir", d)), max_leaves=12)


def build(path: Path, node) -> None:
    if node[0] == "file":
        path.write_bytes(node[1])
    elif node[0] == "fifo":
        os.mkfifo(path)
    elif node[0] == "link":
        os.symlink(node[1], path)
    else:
        path.mkdir()
        for name, child in node[1].items():
            build(path / name, child)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREES)
def test_whatever_a_stick_s_documents_folder_holds_only_plain_files_in_one_level_of_collections_are_listed(tree):
    with tempfile.TemporaryDirectory() as where:
        root = Path(where)
        (root / "OFFGRID").mkdir()
        build(root / "documents", tree)
        listing = read_documents(root)
        for doc in listing.documents:
            parts = doc.file.split("/")
            assert parts[0] == "documents" and len(parts) in (2, 3) and not _junk(parts[-1])
            for i in range(1, len(parts) + 1):  # no symlink anywhere on the way, and a plain file at the end
                mode = os.lstat(root.joinpath(*parts[:i])).st_mode
                assert stat.S_ISREG(mode) if i == len(parts) else stat.S_ISDIR(mode)
            assert doc.collection == (parts[1] if len(parts) == 3 else "default") == check_collection(doc.collection)
            suffix = "." + doc.filename.rsplit(".", 1)[-1].lower() if "." in doc.filename else ""
            assert not suffix or suffix in SUFFIXES
            assert read_document(root, doc.file, 1 << 20) == root.joinpath(*parts).read_bytes()
        assert all(r.file.startswith("documents") and r.reason for r in listing.refused)
        json.dumps([r.reason for r in listing.refused]).encode()  # a job record and an event can carry each reason
        if tree[0] == "dir":  # every plain document file directly in documents/ is listed or refused, never lost
            seen = {d.file for d in listing.documents} | {r.file for r in listing.refused}
            for name, node in tree[1].items():
                if node[0] == "file" and not _junk(name) and "\udcff" not in name:
                    assert f"documents/{name}" in seen
