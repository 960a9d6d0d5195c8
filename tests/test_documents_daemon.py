"""Documents through a real daemon: its own worker embeds an upload, the search finds it by file and page, and the
daemon's event loop never waits on extraction, embedding or sqlite meanwhile."""

from __future__ import annotations

import json
import uuid

import documents_bench as bench
import openai
import pytest
from conftest import EventLog, http, private_state, running_daemon, wait_for


def multipart(fields: dict[str, str], name: str, data: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_a_daemon_reads_embeds_and_finds_an_uploaded_pdf_and_forgets_it_when_deleted(model_state, tmp_path):
    guide = bench.field_guide()
    first_aid = next(d for d in guide["documents"] if d["file"] == "first-aid.md")
    with running_daemon(private_state(model_state, tmp_path / "state"), tmp_path / "daemon.log",
                        env={"OFFGRID_DOCUMENTS_MAX_UPLOAD_BYTES": "100000"}) as daemon:
        events = EventLog(daemon.url)  # what every open page hears
        body, headers = multipart({"collection": "kit"}, "first-aid.pdf", bench.pdf_of(first_aid["pages"]))
        status, _, raw = http("POST", f"{daemon.url}/api/v1/documents", body, headers, timeout=300)
        assert status == 201, raw
        document = json.loads(raw)
        assert (document["kind"], document["pages"], document["chunks"]) == ("pdf", 8, 8)
        body, headers = multipart({"collection": "kit"}, "big.txt", b"x" * 100_001)
        status, _, raw = http("POST", f"{daemon.url}/api/v1/documents", body, headers)
        assert status == 413 and b"max_upload_bytes" in raw
        status, _, raw = http("GET", f"{daemon.url}/api/v1/documents/search?collection=kit&q=recipe+for+oral+"
                                     "rehydration+salts")
        top = json.loads(raw)["passages"][0]
        assert status == 200 and (top["filename"], top["page"]) == ("first-aid.pdf", 6)
        # a chat that names the collection is answered from it, with its sources, streamed or not
        client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="none", max_retries=0, timeout=300)
        question = [{"role": "user", "content": "What is the recipe for oral rehydration salts?"}]
        reply = client.chat.completions.create(model="gemma3-270m", messages=question, max_tokens=24,
                                               temperature=0, extra_body={"offgrid": {"collection": "kit"}})
        sources = reply.model_extra["offgrid"]["sources"]
        assert (sources[0]["file"], sources[0]["page"]) == ("first-aid.pdf", 6) and sources[0]["excerpt"]
        assert reply.usage.prompt_tokens > 100  # the passages went into the prompt
        chunks = list(client.chat.completions.create(model="gemma3-270m", messages=question, max_tokens=4,
                                                     stream=True, extra_body={"offgrid": {"collection": "kit"}}))
        assert chunks[0].model_extra["offgrid"]["sources"] == sources
        assert all("offgrid" not in c.model_extra for c in chunks[1:])
        # a kept conversation keeps what the person asked and the answer's sources, not the passages put in the prompt
        kept = client.chat.completions.with_raw_response.create(
            model="gemma3-270m", messages=question, max_tokens=4, extra_body={"offgrid": {"collection": "kit"}},
            extra_headers={"X-Offgrid-Conversation": "new"})
        conversation = kept.headers["X-Offgrid-Conversation"]
        status, _, raw = http("GET", f"{daemon.url}/api/v1/conversations/{conversation}")
        messages = json.loads(raw)["messages"]
        assert status == 200 and [(m["role"], m["sources"]) for m in messages] == [
            ("user", None), ("assistant", sources)]
        status, _, raw = http("GET", f"{daemon.url}/api/v1/conversations/{conversation}/export?format=md")
        assert status == 200 and "1. first-aid.pdf, page 6" in raw.decode()
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="gemma3-270m", messages=question, max_tokens=4,
                                           extra_body={"offgrid": {"collection": 7}})
        status, _, _ = http("DELETE", f"{daemon.url}/api/v1/documents/{document['id']}")
        assert status == 200
        wait_for(lambda: len(events.of("documents")) == 2, what="the documents events")
        assert events.of("documents") == [{"added": document}, {"deleted": document}]
        status, _, raw = http("GET", f"{daemon.url}/api/v1/documents/search?collection=kit&q=rehydration")
        assert status == 200 and json.loads(raw)["passages"] == []
