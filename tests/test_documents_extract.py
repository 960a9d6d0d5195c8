"""Documents as hostile input: what an upload's bytes and name may be, and what text and chunks come out. No model."""

from __future__ import annotations

import pytest
from fpdf import FPDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offgridd.documents import DocumentError, InvalidDocument, UnsupportedDocument, extract
from offgridd.documents.chunks import MAX_WORD_CHARS, chunk_pages
from offgridd.documents.records import Page, check_collection, clean_filename


def pdf(pages: list[str], **encryption) -> bytes:
    doc = FPDF()
    doc.set_font("Helvetica", size=11)
    if encryption:
        doc.set_encryption(**encryption)
    for text in pages:
        doc.add_page()
        doc.multi_cell(0, 6, text)
    return bytes(doc.output())


def test_a_pdf_is_read_page_by_page():
    got = extract("manual.pdf", pdf(["Boil water for one minute.", "", "Charge the battery weekly."]))
    assert got.kind == "pdf"
    assert [p.number for p in got.pages] == [1, 2, 3]
    assert "Boil water" in got.pages[0].text and got.pages[1].text == "" and "battery" in got.pages[2].text


def test_html_keeps_what_a_person_reads_and_drops_scripts_styles_and_markup():
    html = b"""<!doctype html><html><head><title>t</title><script>var secret = "TOKEN1";</script>
    <style>body { color: red }</style></head><body onload="steal()"><h1>Water</h1>
    <p>Boil it &amp; let it cool.</p><script type="text/javascript">document.write("TOKEN2")</script>
    <noscript>TOKEN3</noscript><div>Store it<br>covered</div><svg><text>TOKEN4</text></svg></body></html>"""
    got = extract("page.html", html)
    text = got.pages[0].text
    assert got.kind == "html" and len(got.pages) == 1
    assert "Water" in text and "Boil it & let it cool." in text and "Store it\ncovered" in text
    for hidden in ("TOKEN", "steal", "color", "<", "var secret"):
        assert hidden not in text


def test_html_without_a_closing_head_still_gives_its_body():
    assert extract("x.htm", b"<html><head><title>t</title><body><p>the body text</p>").pages[0].text == "the body text"


def test_text_and_markdown_pages_are_split_at_form_feeds():
    got = extract("notes.md", b"# One\nfirst page\fsecond page\r\n\r\n\r\nstill second\f")
    assert got.kind == "markdown"
    assert [p.text for p in got.pages] == ["# One\nfirst page", "second page\n\nstill second", ""]
    assert extract("notes", b"plain words").kind == "text"


@pytest.mark.parametrize(("name", "data", "error", "words"), [
    ("empty.txt", b"", InvalidDocument, "empty"),
    ("fake.pdf", b"MZ\x90\x00 this is an executable", InvalidDocument, "not one"),
    ("fake.pdf", b"<html>not a pdf</html>", InvalidDocument, "not one"),
    ("broken.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage", InvalidDocument, "could not be read"),
    ("tool.exe", b"MZ\x90\x00", UnsupportedDocument, ".exe"),
    ("report.docx", b"PK\x03\x04", UnsupportedDocument, ".docx"),
    ("binary.txt", b"abc\x00def", InvalidDocument, "binary"),
    ("latin1.txt", "café".encode("latin-1"), InvalidDocument, "UTF-8"),
    ("blank.md", b" \n\t\f \f\n", InvalidDocument, "no text"),
    ("scripts-only.html", b"<script>alert(1)</script><style>p{}</style>", InvalidDocument, "no text"),
])
def test_an_upload_that_is_not_what_it_claims_is_refused_with_a_reason(name, data, error, words):
    with pytest.raises(error, match=words):
        extract(name, data)


def test_a_truncated_pdf_is_refused_or_read_never_a_crash():
    whole = pdf(["some words on a page"] * 3)
    for cut in (20, len(whole) // 3, len(whole) // 2, len(whole) - 40):
        try:
            extract("cut.pdf", whole[:cut])
        except DocumentError:
            pass


def test_a_pdf_locked_with_a_password_is_refused_and_one_open_to_read_is_read():
    with pytest.raises(InvalidDocument, match="password"):
        extract("locked.pdf", pdf(["secret plans"], owner_password="o", user_password="u"))
    assert "plans" in extract("open.pdf", pdf(["open plans"], owner_password="o")).pages[0].text


@pytest.mark.parametrize(("given_name", "shown"), [
    ("../../etc/passwd", "passwd"), ("C:\\Users\\me\\notes.txt", "notes.txt"), ("/abs/path/a.md", "a.md"),
    ("..%2F..%2Fetc%2Fpasswd", "passwd"),
    ("\x00\x1b[31mred.txt\u202e", "[31mred.txt"), ("..", "document"), ("", "document"), (None, "document"),
    ("x" * 500 + ".txt", "x" * 200),
])
def test_a_file_name_is_only_ever_a_name_to_show(given_name, shown):
    assert clean_filename(given_name) == shown


def test_collection_names_are_plain():
    assert check_collection(None) == check_collection("") == "default"
    assert check_collection("Field notes_2.1") == "Field notes_2.1"
    for bad in ("../x", "a/b", " lead", "x" * 65, "名前!", 5):
        with pytest.raises(InvalidDocument):
            check_collection(bad)


def test_chunks_overlap_stay_within_their_page_and_none_is_a_scrap():
    pages = [Page(number=1, text=" ".join(f"w{i}" for i in range(250))), Page(number=2, text="short page"),
             Page(number=3, text="")]
    chunks = chunk_pages(pages, words=100, overlap=20)
    assert [(c.page, c.seq) for c in chunks] == [(1, 0), (1, 1), (1, 2), (2, 3)]
    first, second, last = (c.text.split() for c in chunks[:3])
    assert first[-20:] == second[:20] and len(last) == 100 and last[-1] == "w249"
    assert chunks[3].text == "short page"
    assert all(len(w) <= MAX_WORD_CHARS for w in chunk_pages([Page(number=1, text="a" * 1000)], words=10,
                                                             overlap=2)[0].text.split())
    with pytest.raises(ValueError):
        chunk_pages(pages, words=10, overlap=10)


@settings(deadline=5000, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["a.pdf", "a.html", "a.md", "a.txt", "a", "a.bin", "../a.pdf"]),
       data=st.one_of(st.binary(max_size=2048),
                      st.builds(lambda b: b"%PDF-1.4\n" + b, st.binary(max_size=2048)),
                      st.builds(lambda t: t.encode(), st.text(max_size=2048))))
def test_any_bytes_under_any_name_are_read_or_refused_with_a_document_error(name, data):
    try:
        got = extract(name, data)
    except DocumentError as e:
        assert str(e)
        return
    assert any(p.text for p in got.pages)
    for page in got.pages:
        assert all(ch in "\n\t" or ch >= " " for ch in page.text)
