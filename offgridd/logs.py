"""Logging: to the journal (structured) when systemd connected stderr to it, else plain lines on stderr."""

from __future__ import annotations

import logging
import os
import sys


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=dev:ino for the stream it connected; compare it with our stderr."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request its parser refuses (answered 400) with a traceback at error level; from a hostile LAN
    those would fill the journal. One debug line says what it was."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if type(error).__name__ in ("BadHttpMessage", "BadStatusLine", "LineTooLong", "InvalidHeader",
                                    "InvalidURLError", "BadHttpMethod", "TransferEncodingError"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.msg, record.args, record.exc_info, record.exc_text = f"refused a malformed request: {error}", (), \
                None, None
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup_logging(level: str = "info") -> str:
    """Configure the root logger; returns where logs go ('journal' or 'stderr')."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    target = "stderr"
    if _stderr_is_journal():
        try:
            from systemd.journal import JournalHandler

            handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="offgridd")
            handler.setFormatter(logging.Formatter("%(message)s"))
            target = "journal"
        except ImportError:
            handler = logging.StreamHandler()
    else:
        handler = logging.StreamHandler()
    if target == "stderr":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_MalformedRequests())
    return target
