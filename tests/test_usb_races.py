"""Two races of issue #14 at the USB edge, on real files: an import whose HTTP client leaves keeps the stick's lock
until its copy ends, and writing a stick never follows a link planted where its temporary files go."""

import asyncio
from pathlib import Path

from gguf_factory import gguf_bytes

from offgridd.db import Database
from offgridd.events import EventBus
from offgridd.inference import ModelPool
from offgridd.jobs import JobBoard
from offgridd.metrics import Metrics
from offgridd.settings import load_settings
from offgridd.store import ModelStore
from offgridd.usb import ModelSource, write_stick
from offgridd.usb.watcher import UsbWatcher
from offgridd.usb.writer import MODELS_DIR


def big_model(path: Path) -> Path:
    path.write_bytes(gguf_bytes(elements=16 << 20))  # 128 MiB of tensors: the copy takes a while
    return path


async def test_an_import_whose_caller_leaves_holds_the_stick_until_its_copy_ends(tmp_path):
    stick = tmp_path / "stick"
    stick.mkdir()
    write_stick(stick, [ModelSource(name="big", path=big_model(tmp_path / "big.gguf"), license="MIT")])
    settings = load_settings(env={}, flags={"state": str(tmp_path / "state")})
    store = ModelStore(settings.state / "models")
    store.open()
    db = Database(settings.state / "offgridd.db")
    bus = EventBus()
    bus.bind(asyncio.get_running_loop())
    watcher = UsbWatcher(settings.usb, store, JobBoard(db, bus), bus, ModelPool(store, settings, Metrics()))
    with bus.subscribe() as events:
        caller = asyncio.create_task(watcher.import_path(stick))
        while (await events.get()).data.get("state") != "importing":
            pass
    caller.cancel()  # the HTTP client went away
    await asyncio.sleep(0.05)
    assert watcher._lock.locked() and watcher.importing == str(stick)  # the copy thread still owns the stick
    report = await watcher.import_path(stick)  # a second import waits its turn, then finds the model there
    assert [r.state for r in report.results] == ["skipped"]
    assert store.get("big").sha256 and store.verify("big")[0]
    assert not any((store.root / ".staging").iterdir())
    db.close()


def test_writing_a_stick_never_follows_a_link_left_at_its_temporary_names(tmp_path):
    stick, victim = tmp_path / "stick", tmp_path / "victim.txt"
    victim.write_text("keep me")
    (stick / MODELS_DIR).mkdir(parents=True)
    model = tmp_path / "m.gguf"
    model.write_bytes(gguf_bytes())
    (stick / MODELS_DIR / "m.gguf.partial").symlink_to(victim)
    (stick / "OFFGRID" / "manifest.json.partial").symlink_to(victim)
    written = write_stick(stick, [ModelSource(name="m", path=model, license="MIT")])
    assert victim.read_text() == "keep me"
    assert (stick / written[0].file).read_bytes() == model.read_bytes()
    assert not (stick / MODELS_DIR / "m.gguf.partial").is_symlink()
