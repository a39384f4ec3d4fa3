"""Hot reload of the price table.

A :class:`PriceBook` holds the table in force. ``reload()`` re-reads the file and swaps a new
table in with one attribute assignment, so a request always sees one whole table, old or new.
A broken edit never takes effect: the last good table stays and the error (with file:line) is
kept in ``last_error`` and logged as ``prices_reload_failed``.

Changes are found by polling (``watch``) and on SIGHUP (``install_sighup``). The poll compares
``(st_mtime_ns, st_size, st_ino)`` of the path *followed* through symlinks and of the directory
entry itself, so the Kubernetes ConfigMap update (``..data`` symlink repointed to a new
directory) is seen even though ``prices.yaml`` itself never changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import structlog

from gateway.billing.pricing import PriceTable, load_prices
from gateway.errors import ConfigError

__all__ = ["PriceBook", "file_signature"]

_Stat = tuple[int, int, int]
Signature = tuple[_Stat | None, _Stat | None]


def file_signature(path: Path) -> Signature:
    """What a poll compares: the followed file's and the directory entry's (mtime_ns, size, inode)."""

    def take(follow: bool) -> _Stat | None:
        try:
            st = os.stat(path, follow_symlinks=follow)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    return (take(True), take(False))


class PriceBook:
    """The price table in force, reloaded from ``path`` on change."""

    def __init__(self, path: Path, servers: Collection[str], *, table: PriceTable | None = None):
        """Load the table now (ConfigError if the file is bad) unless ``table`` is given."""
        self.path = Path(path)
        self._servers = frozenset(servers)
        self._lock = threading.Lock()
        self._log: Any = structlog.get_logger()
        self._signature = file_signature(self.path)
        self._table = table if table is not None else load_prices(self.path, self._servers)
        self._last_error: ConfigError | None = None
        self.loaded_at = time.time()  # when the table in force was loaded

    @property
    def table(self) -> PriceTable:
        return self._table

    @property
    def last_error(self) -> ConfigError | None:
        """The error of the last reload attempt; None once a reload succeeded (or nothing failed)."""
        return self._last_error

    def reload(self) -> bool:
        """Re-read the file; True if a new table is now in force. Never raises for a bad file."""
        with self._lock:
            previous = self._table
            try:
                table = load_prices(self.path, self._servers)
            except ConfigError as exc:
                self._last_error = exc
                self._log.warning(
                    "prices_reload_failed",
                    path=str(self.path),
                    error=exc.message,
                    file=exc.file,
                    line=exc.line,
                    digest_in_force=previous.digest,
                )
                return False
            self._last_error = None
            if table.digest == previous.digest:
                return False
            self._table = table  # the swap: one attribute assignment
            self.loaded_at = time.time()
            self._log.info("prices_reloaded", path=str(self.path), digest=table.digest, previous_digest=previous.digest)
            return True

    def check_once(self) -> bool:
        """One poll step: reload if the file's signature changed; True if a new table is in force."""
        signature = file_signature(self.path)
        if signature == self._signature:
            return False
        # Remember the signature before reading: a write landing after this read changes it again.
        self._signature = signature
        return self.reload()

    async def watch(self, interval_s: float = 0.5) -> None:
        """Poll the file every ``interval_s`` seconds and reload on change, until cancelled."""
        while True:
            try:
                await asyncio.to_thread(self.check_once)
            except Exception as exc:  # noqa: BLE001  # the watcher must outlive a bug in one poll
                self._log.error("prices_watch_failed", path=str(self.path), error=repr(exc))
            await asyncio.sleep(interval_s)

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Reload on SIGHUP. False (nothing installed) where the platform has no such signal handling."""
        sighup = getattr(signal, "SIGHUP", None)
        if sighup is None:
            return False
        try:
            loop.add_signal_handler(sighup, self._on_sighup)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
            return False
        return True

    def remove_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        sighup = getattr(signal, "SIGHUP", None)
        if sighup is None:
            return
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(sighup)

    def _on_sighup(self) -> None:
        self._log.info("prices_reload_requested", path=str(self.path), reason="SIGHUP")
        self._signature = file_signature(self.path)
        self.reload()
