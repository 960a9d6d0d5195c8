"""Documents: retrieval quality (recall@5 of hybrid, vector-only and BM25-only search), ingestion speed and query
latency, on the public question/passage set in tests/data/field_guide.json, embedded by the box's own model.

    .venv/bin/python bench/documents_bench.py [--model gemma3-270m] [--threads 2] [--keep DIR]

The set is four field-guide documents of eight pages each (CC0; see its "about"), uploaded as the box receives them:
two as PDFs (generated here with fpdf2, one passage a page), one as Markdown and one as plain text (pages split by
form feeds). A question counts as found when a passage from its page (file and page) is among the top 5. The model
runs in a real inference worker, as the daemon runs it. "shared" is the same collection taken by a second store as a
peer hands it over (documents/share.py; the network is left out). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from offgridd.db import Database
from offgridd.documents import DocumentStore, Limits
from offgridd.inference import Admission, Inference, ModelPool
from offgridd.metrics import Metrics
from offgridd.settings import Settings, load_settings
from offgridd.store import ModelStore, register_builtin

SET = Path(__file__).resolve().parent.parent / "tests" / "data" / "field_guide.json"
COLLECTION = "field-guide"
AS_PDF = ("water.md", "radio-and-navigation.md")  # uploaded as PDFs; the others as Markdown and text


def field_guide() -> dict:
    return json.loads(SET.read_text())


def pdf_of(pages: list[str]) -> bytes:
    """A PDF with one page per text, as a word processor would write it (fpdf2, Helvetica)."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def uploads(guide: dict) -> list[tuple[str, bytes, int]]:
    """(file name, bytes, pages) for each document of the set, in the formats named above."""
    out = []
    for i, document in enumerate(guide["documents"]):
        name, pages = document["file"], document["pages"]
        if name in AS_PDF:
            out.append((name.removesuffix(".md") + ".pdf", pdf_of(pages), len(pages)))
        elif i % 2:
            out.append((name.removesuffix(".md") + ".txt", "\f".join(pages).encode(), len(pages)))
        else:
            out.append((name, "\f".join(pages).encode(), len(pages)))
    return out


def stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


async def recall(store: DocumentStore, questions: list[dict], *, method: str, k: int = 5,
                 collection: str = COLLECTION) -> tuple[float, list[float]]:
    """(recall@k, per-query seconds): the share of questions with a passage from their page in the top k."""
    found, seconds = 0, []
    for question in questions:
        started = time.perf_counter()
        passages = await store.search(question["q"], collection, top_k=k, method=method)
        seconds.append(time.perf_counter() - started)
        found += any(stem(p.filename) == stem(question["file"]) and p.page == question["page"] for p in passages)
    return found / len(questions), seconds


def embedding_inference(state: Path, model: str, threads: int) -> tuple[Inference, Settings]:
    """The box's inference on a state directory holding the built-in model (registered here if missing)."""
    settings = load_settings(env={}, flags={"state": str(state), "threads": threads, "ctx": 2048, "model": model})
    store = ModelStore(state / "models")
    store.open()
    register_builtin(store)
    metrics = Metrics()
    return Inference(ModelPool(store, settings, metrics), Admission(1, 64, 600.0), metrics), settings


async def measure(state: Path, model: str, threads: int) -> dict:
    inference, _ = embedding_inference(state, model, threads)
    db = Database(state / "offgridd.db")

    async def embed(texts: list[str]) -> list[list[float]]:
        return (await inference.embed(model, texts)).vectors

    store = DocumentStore(db, embed, model=model, limits=Limits())
    try:
        await embed(["warm-up"])  # the worker's start and the embedding context's creation are not ingestion
        guide = field_guide()
        ingest = []
        for name, data, pages in uploads(guide):
            started = time.perf_counter()
            document = await store.add(COLLECTION, name, data)
            ingest.append({"file": name, "bytes": len(data), "pages": pages, "chunks": document.chunks,
                           "seconds": round(time.perf_counter() - started, 3)})
        total_s = sum(i["seconds"] for i in ingest)
        out: dict = {"model": model, "threads": threads, "questions": len(guide["questions"]),
                     "pages": sum(i["pages"] for i in ingest), "chunks": sum(i["chunks"] for i in ingest),
                     "ingest": ingest, "pages_per_second": round(sum(i["pages"] for i in ingest) / total_s, 2),
                     "recall_at_5": {}, "recall_at_1": {}, "query_ms": {}}
        for method in ("hybrid", "vector", "bm25"):
            value, seconds = await recall(store, guide["questions"], method=method)
            out["recall_at_5"][method] = round(value, 3)
            ms = sorted(s * 1000 for s in seconds)
            out["query_ms"][method] = {"median": round(statistics.median(ms), 2),
                                       "p95": round(ms[int(0.95 * (len(ms) - 1))], 2)}
        for method in ("hybrid", "vector", "bm25"):  # a stricter view of the same rankings: the first passage
            out["recall_at_1"][method] = round((await recall(store, guide["questions"], method=method, k=1))[0], 3)
        out["shared"] = await share(store, state / "shared.db", embed, model, guide)
        return out
    finally:
        await inference.pool.stop()
        db.close()


async def share(store: DocumentStore, path: Path, embed, model: str, guide: dict) -> dict:
    """The collection taken by a second box as a peer hands it over (share.py, without the network): how long
    that takes beside ingesting the files, and whether search there finds the same pages."""
    db = Database(path)
    other = DocumentStore(db, embed, model=model, limits=Limits())
    try:
        started, total = time.perf_counter(), 0
        for document in await store.list(COLLECTION):
            data = await store.export(document.id)
            total += len(data)
            await other.add_shared(COLLECTION, data, source="the benchmark")
        seconds = time.perf_counter() - started
        return {"seconds": round(seconds, 3), "bytes": total, "pages_per_second": round(
            sum(d.pages for d in await other.list(COLLECTION)) / seconds, 2),
            "recall_at_5_hybrid": round((await recall(other, guide["questions"], method="hybrid"))[0], 3)}
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="a state directory to use and keep (default: a temporary one)")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(measure(args.keep, args.model, args.threads))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(measure(Path(tmp), args.model, args.threads))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
