"""`img daemon`: resumes orphaned runs, then serves a spool directory watched with pyinotify.

Drop a file into the spool directory (default ``$IMG_HOME/spool``) to have an image processed:
  * its name is the reference (a family name), or
  * its first line is ``REF [NAME]`` (needed for s3:// references, which cannot be file names).
Files are picked up when closed after writing or moved in (write elsewhere + ``mv`` is the atomic way).
When done the file moves to ``spool/done/`` or ``spool/failed/`` (with the error appended).
Dot-files are ignored. Requests already in the directory at startup are processed too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import click

from img.cli_common import config_from

log = logging.getLogger("img.daemon")


class Spool:
    def __init__(self, runner: Any, config: Any, spool: Path, workers: int = 4) -> None:
        self.runner = runner
        self.config = config
        self.dir = spool
        self.done = spool / "done"
        self.failed = spool / "failed"
        for d in (self.dir, self.done, self.failed):
            d.mkdir(parents=True, exist_ok=True)
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(workers)
        self.stopping = threading.Event()

    def request(self, path: Path) -> tuple[str, str | None]:
        text = ""
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = path.read_text()[:4096]
        words = text.split()
        if words:
            return words[0], (words[1] if len(words) > 1 else None)
        return path.name, None

    def submit(self, path: Path) -> None:
        if path.name.startswith(".") or not path.is_file():
            return
        with self._lock:
            if path.name in self._busy:
                return
            self._busy.add(path.name)
        threading.Thread(target=self._handle, args=(path,), name=f"spool-{path.name}", daemon=True).start()

    def _handle(self, path: Path) -> None:
        from img.refs import RefError, check_name, parse
        from img.workflows import WorkflowError

        with self._slots:
            try:
                ref_text, name = self.request(path)
                try:
                    ref = parse(ref_text, self.config)
                    name = check_name(name or ref.default_name)
                    resp = self.runner.process(ref, name)
                    log.info("%s: active as %s at %s", ref.canonical, name, resp.device)
                    self._finish(path, self.done, f"ok {resp.device}\n")
                except (RefError, WorkflowError) as e:
                    log.error("%s: %s", path.name, e)
                    self._finish(path, self.failed, f"error: {e}\n")
                except Exception as e:  # keep serving the spool whatever one request does
                    log.exception("%s: unexpected failure", path.name)
                    self._finish(path, self.failed, f"error: {e!r}\n")
            finally:
                with self._lock:
                    self._busy.discard(path.name)

    def _finish(self, path: Path, where: Path, line: str) -> None:
        target = where / path.name
        try:
            os.replace(path, target)
            with target.open("a") as f:
                f.write(line)
        except OSError as e:
            log.error("%s: cannot move to %s: %s", path, where, e)

    def scan(self) -> None:
        for p in sorted(self.dir.iterdir()):
            self.submit(p)

    def watch(self) -> None:
        import pyinotify

        spool = self

        class Handler(pyinotify.ProcessEvent):
            def process_IN_CLOSE_WRITE(self, event: Any) -> None:
                spool.submit(Path(event.pathname))

            def process_IN_MOVED_TO(self, event: Any) -> None:
                spool.submit(Path(event.pathname))

        wm = pyinotify.WatchManager()
        notifier = pyinotify.Notifier(wm, Handler(), timeout=500)
        wm.add_watch(str(self.dir), pyinotify.IN_CLOSE_WRITE | pyinotify.IN_MOVED_TO)
        self.scan()  # after the watch: nothing dropped in between is missed
        try:
            while not self.stopping.is_set():
                if notifier.check_events(500):
                    notifier.read_events()
                    notifier.process_events()
        finally:
            notifier.stop()


@click.command("daemon")
@click.option("--spool", "spool_dir", type=click.Path(path_type=Path),
              help="Spool directory to watch (default $IMG_HOME/spool).")
@click.option("--workers", default=4, show_default=True, help="Images processed at once.")
def daemon(spool_dir: Path | None, workers: int) -> None:
    """Resume orphaned runs, then process references dropped into the spool directory."""
    from img.progress import LineReporter
    from img.workflows import Runner

    logging.basicConfig(level=logging.INFO, format="img-daemon: %(levelname)s %(message)s")
    cfg = config_from()
    runner = Runner(cfg, LineReporter())
    spool = Spool(runner, cfg, spool_dir or cfg.spool_dir, workers)

    def stop(signum: int, frame: Any) -> None:
        spool.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    resumed = runner.manager.resume()
    if resumed:
        log.info("resumed %d orphaned run(s)", len(resumed))
    log.info("watching %s", spool.dir)
    try:
        spool.watch()
    finally:
        runner.close()  # shutdown: unfinished runs stay resumable
