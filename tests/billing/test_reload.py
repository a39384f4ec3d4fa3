"""Hot reload of the price table: polling, broken edits, recovery and ConfigMap symlink swaps."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.billing.reload import PriceBook, file_signature
from gateway.errors import ConfigError

SERVERS = ("weather",)
V1 = "weather:\n  tools:\n    get_forecast: 5\n"
V2 = "weather:\n  tools:\n    get_forecast: 7.5\n"
BROKEN = "weather:\n  tools:\n    get_forecast: 5\n    premium: 0.0001\n"


def price(book: PriceBook) -> int:
    return book.table.lookup("weather", "tool", "get_forecast")


@pytest.fixture
def prices(tmp_path: Path) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(V1, encoding="utf-8")
    return path


def test_an_unchanged_file_is_not_reloaded(prices: Path) -> None:
    book = PriceBook(prices, SERVERS)
    assert price(book) == 5000
    assert book.check_once() is False
    assert book.last_error is None


def test_editing_the_file_changes_lookups_after_one_check(prices: Path) -> None:
    book = PriceBook(prices, SERVERS)
    first_digest = book.table.digest
    prices.write_text(V2, encoding="utf-8")  # a different length: the size changes
    with capture_logs() as logs:
        assert book.check_once() is True
    assert price(book) == 7500
    assert book.table.digest != first_digest
    assert [e["event"] for e in logs] == ["prices_reloaded"]
    assert logs[0]["digest"] == book.table.digest
    assert logs[0]["previous_digest"] == first_digest


def test_an_edit_of_the_same_size_is_seen_through_mtime(prices: Path) -> None:
    book = PriceBook(prices, SERVERS)
    same_size = V1.replace("5", "6")
    assert len(same_size) == len(V1)
    prices.write_text(same_size, encoding="utf-8")
    st = prices.stat()
    os.utime(prices, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert book.check_once() is True
    assert price(book) == 6000


def test_touching_the_file_without_changing_it_does_not_swap_the_table(prices: Path) -> None:
    book = PriceBook(prices, SERVERS)
    table = book.table
    st = prices.stat()
    os.utime(prices, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with capture_logs() as logs:
        assert book.check_once() is False
    assert book.table is table
    assert logs == []


def test_a_broken_edit_keeps_the_old_table_and_records_the_error_with_its_line(prices: Path) -> None:
    book = PriceBook(prices, SERVERS)
    table = book.table
    prices.write_text(BROKEN, encoding="utf-8")
    with capture_logs() as logs:
        assert book.check_once() is False
    assert book.table is table
    assert price(book) == 5000
    assert isinstance(book.last_error, ConfigError)
    assert book.last_error.line == 4
    assert str(book.last_error).startswith(f"{prices}:4: ")
    assert [e["event"] for e in logs] == ["prices_reload_failed"]
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["line"] == 4
    assert "more than 3 decimal places" in logs[0]["error"]


def test_a_broken_edit_is_logged_once_not_on_every_poll(prices: Path) -> None:
    book = PriceBook(prices, SERVERS)
    prices.write_text(BROKEN, encoding="utf-8")
    with capture_logs() as logs:
        book.check_once()
        book.check_once()
        book.check_once()
    assert len(logs) == 1


def test_restoring_a_good_file_recovers(prices: Path) -> None:
    book = PriceBook(prices, SERVERS)
    prices.write_text(BROKEN, encoding="utf-8")
    book.check_once()
    assert book.last_error is not None

    prices.write_text(V2, encoding="utf-8")
    assert book.check_once() is True
    assert price(book) == 7500
    assert book.last_error is None


def test_restoring_the_same_good_content_clears_the_error(prices: Path) -> None:
    book = PriceBook(prices, SERVERS)
    table = book.table
    prices.write_text(BROKEN, encoding="utf-8")
    book.check_once()
    prices.write_text(V1, encoding="utf-8")
    assert book.check_once() is False  # same digest: nothing to swap
    assert book.table is table
    assert book.last_error is None


def test_a_deleted_file_keeps_the_old_table(prices: Path) -> None:
    book = PriceBook(prices, SERVERS)
    prices.unlink()
    assert book.check_once() is False
    assert price(book) == 5000
    assert book.last_error is not None and "not found" in book.last_error.message
    prices.write_text(V2, encoding="utf-8")
    assert book.check_once() is True
    assert price(book) == 7500


def test_a_bad_file_at_startup_raises(prices: Path) -> None:
    prices.write_text(BROKEN, encoding="utf-8")
    with pytest.raises(ConfigError):
        PriceBook(prices, SERVERS)


def test_an_explicit_reload_picks_up_a_change_without_polling(prices: Path) -> None:
    book = PriceBook(prices, SERVERS)
    prices.write_text(V2, encoding="utf-8")
    assert book.reload() is True
    assert price(book) == 7500
    assert book.reload() is False


def test_a_configmap_style_symlink_swap_is_detected(tmp_path: Path) -> None:
    # The Kubernetes layout: prices.yaml -> ..data/prices.yaml, ..data -> ..v1
    mount = tmp_path / "config"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v2").mkdir()
    (mount / "..v1" / "prices.yaml").write_text(V1, encoding="utf-8")
    (mount / "..v2" / "prices.yaml").write_text(V1.replace("5", "6"), encoding="utf-8")  # same size
    os.symlink("..v1", mount / "..data")
    os.symlink("..data/prices.yaml", mount / "prices.yaml")
    book = PriceBook(mount / "prices.yaml", SERVERS)
    assert price(book) == 5000
    before = file_signature(mount / "prices.yaml")

    os.symlink("..v2", mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")  # the atomic swap kubelet does

    assert file_signature(mount / "prices.yaml") != before
    assert book.check_once() is True
    assert price(book) == 6000


async def test_watch_polls_until_cancelled(prices: Path) -> None:
    book = PriceBook(prices, SERVERS)
    reloaded = asyncio.Event()
    original = book.check_once

    def check_once() -> bool:
        changed = original()
        if changed:
            reloaded.set()
        return changed

    book.check_once = check_once  # type: ignore[method-assign]
    await asyncio.to_thread(prices.write_text, V2, encoding="utf-8")
    task = asyncio.create_task(book.watch(interval_s=0.001))
    await asyncio.wait_for(reloaded.wait(), timeout=5)
    assert price(book) == 7500
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
async def test_sighup_reloads_the_prices(prices: Path) -> None:
    loop = asyncio.get_running_loop()
    book = PriceBook(prices, SERVERS)
    assert book.install_sighup(loop) is True
    try:
        await asyncio.to_thread(prices.write_text, V2, encoding="utf-8")
        reloaded = asyncio.Event()
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(1000):  # the handler runs on a later loop iteration; no sleeping
            if price(book) == 7500:
                reloaded.set()
                break
            await asyncio.sleep(0)
        assert reloaded.is_set()
    finally:
        book.remove_sighup(loop)
