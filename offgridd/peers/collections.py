"""Collections of documents shared across the fleet, pulled on request: a member lists a collection's documents and
hands each one over as documents/share.py packs it, in answers signed with the fleet key; the box pulling checks
every answer, then every field, and keeps each document whole or not at all, one job each."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from urllib.parse import quote

import aiohttp

from ..documents import DocumentError, DocumentExists, DocumentStore
from ..documents.share import MAX_SHARED_BYTES
from ..jobs import JobBoard
from .exchange import ExchangeRefused
from .peer import Peer

log = logging.getLogger(__name__)

COLLECTION_PATH = "/fleet/v2/collections/"  # + the collection's name (quoted): its documents, JSON
DOCUMENT_PATH = "/fleet/v2/documents/"  # + a document's id: the document as shared, msgpack
KIND = "peer-document"
MAX_LIST_BYTES = 4 << 20
DOCUMENT_SECONDS = 600  # for one document's answer: a large one on a busy Pi Zero takes a while


class PullError(Exception):
    """The pull cannot start: no such peer, or it would not list the collection."""


@dataclass(slots=True, kw_only=True)
class PulledDocument:
    filename: str
    state: str  # done | skipped | failed
    reason: str
    job: str
    document_id: int | None = None


@dataclass(slots=True, kw_only=True)
class CollectionPull:
    peer: str
    collection: str  # on the peer
    into: str  # here
    documents: list[PulledDocument] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"peer": self.peer, "collection": self.collection, "into": self.into,
                "ok": all(d.state != "failed" for d in self.documents),
                "documents": [asdict(d) for d in self.documents]}


def _listing(body: bytes) -> list[dict]:
    """The documents a member listed, each with an id, a file name, a size and a sha256; anything else is dropped."""
    entries = json.loads(body).get("documents")
    if not isinstance(entries, list):
        raise ValueError("the listing has no documents")
    return [d for d in entries if isinstance(d, dict) and isinstance(d.get("id"), int)
            and isinstance(d.get("filename"), str) and isinstance(d.get("sha256"), str)
            and isinstance(d.get("size"), int)]


# a signed GET to a member whose whole answer is proved its own: PeerService.fetch(peer, path, limit, seconds=)
Fetch = Callable[..., Awaitable[tuple[int, bytes]]]


async def pull_collection(fetch: Fetch, jobs: JobBoard, documents: DocumentStore, peer: Peer, collection: str,
                          into: str | None = None) -> CollectionPull:
    """Every document of `collection` on `peer` this box lacks, into its collection `into` (the same name unless
    given): documents already here (same sha256) are skipped without being fetched."""
    into = into or collection
    try:
        status, body = await fetch(peer, COLLECTION_PATH + quote(collection, safe=""), MAX_LIST_BYTES)
        if status != 200:
            raise PullError(f"peer {peer.name} answered HTTP {status} for its collection {collection!r}: "
                            f"{body[:300].decode(errors='replace')}")
        listed = _listing(body)
    except (ExchangeRefused, aiohttp.ClientError, TimeoutError, ValueError) as e:
        raise PullError(f"peer {peer.name} did not list its collection {collection!r}: "
                        f"{e or type(e).__name__}") from None
    have = {d.sha256 for d in await documents.list(into)}
    report = CollectionPull(peer=peer.name, collection=collection, into=into)
    for entry in listed:
        job = jobs.start(KIND, f"peer {peer.name} ({peer.address}) {collection}/{entry['filename']}",
                         entry["filename"], entry["size"])
        result = PulledDocument(filename=entry["filename"], state="failed", reason="", job=job.id)
        if entry["sha256"] in have:
            result.state, result.reason = "skipped", f"already in collection {into!r} (same sha256)"
        elif entry["size"] > documents.limits.max_upload_bytes:  # as an upload of it here would be
            result.reason = (f"{entry['filename']} was {entry['size']:,} bytes; this box takes documents of at most "
                             f"{documents.limits.max_upload_bytes:,} (documents.max_upload_bytes); it was not fetched")
        else:
            try:
                status, data = await fetch(peer, DOCUMENT_PATH + str(entry["id"]), MAX_SHARED_BYTES,
                                           seconds=DOCUMENT_SECONDS)
                if status != 200:
                    raise ValueError(f"HTTP {status}: {data[:300].decode(errors='replace')}")
                document = await documents.add_shared(into, data, source=f"peer {peer.name}")
                result.state, result.document_id = "done", document.id
                result.reason = (f"into collection {into!r} as document {document.id}: {document.kind}, "
                                 f"{document.pages} page(s), {document.chunks} chunk(s), signed by {peer.name}")
            except DocumentExists as e:
                result.state, result.reason = "skipped", str(e)
            except DocumentError as e:
                result.reason = f"{e}; nothing was kept"
            except (ExchangeRefused, aiohttp.ClientError, TimeoutError, ValueError) as e:
                result.reason = f"fetching it from {peer.name} failed: {e or type(e).__name__}; nothing was kept"
            except Exception as e:  # the embedding model busy or failing: this document fails, the rest go on
                result.reason = f"{type(e).__name__}: {e}; nothing was kept"
        jobs.finish(job, result.state, result.reason)
        log.log(logging.WARNING if result.state == "failed" else logging.INFO, "pull of %s/%s from %s: %s (%s)",
                collection, entry["filename"], peer.name, result.state, result.reason)
        report.documents.append(result)
    return report
