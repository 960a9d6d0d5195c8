"""USB sticks: the stick format (models, and documents in documents/), verified imports from it, writing it, and the
udev watch (`watcher.UsbWatcher`)."""

from .importer import ModelResult, StickReport, import_stick
from .stick import FORMAT_VERSION, Stick, StickError, StickModel, read_stick
from .writer import ModelSource, StickWriteError, write_documents, write_stick

__all__ = [
    "FORMAT_VERSION", "ModelResult", "ModelSource", "Stick", "StickError", "StickModel", "StickReport",
    "StickWriteError", "import_stick", "read_stick", "write_documents", "write_stick",
]
