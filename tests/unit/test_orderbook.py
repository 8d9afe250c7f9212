"""L2 book maintenance and Binance's diff-depth sync procedure, on recorded Binance futures data."""

from __future__ import annotations

import csv
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meltica.domain import Side
from meltica.domain.orderbook import DepthDiff, DepthSynchronizer, L2Book
from meltica.errors import BookGapError

DATA = Path(__file__).resolve().parents[1] / "data"
BINANCE = DATA / "binance"
TARDIS = DATA / "tardis"


def _rows(name: str) -> list[dict[str, str]]:
    with (BINANCE / name).open(newline="") as handle:
        return list(csv.DictReader(handle))


def _snapshot() -> tuple[list[tuple[str, str]], list[tuple[str, str]], int]:
    rows = _rows("btcusdt-depth-snap.csv")
    bids = [(r["price"], r["qty"]) for r in rows if r["side"] == "b"]
    asks = [(r["price"], r["qty"]) for r in rows if r["side"] == "a"]
    return bids, asks, int(rows[0]["last_update_id"])


def _recorded_diff() -> DepthDiff:
    rows = _rows("btcusdt-depth-update.csv")
    first = rows[0]
    return DepthDiff(
        first_id=int(first["first_update_id"]),
        last_id=int(first["last_update_id"]),
        prev_last_id=int(first["pu"]),
        bids=[(r["price"], r["qty"]) for r in rows if r["side"] == "b"],
        asks=[(r["price"], r["qty"]) for r in rows if r["side"] == "a"],
    )


def _split_chain(diff: DepthDiff, parts: int) -> list[DepthDiff]:
    """The recorded diff's levels cut into a ``pu``-chained sequence of smaller futures diffs."""
    levels = [(True, lv) for lv in diff.bids] + [(False, lv) for lv in diff.asks]
    size = -(-len(levels) // parts)
    out: list[DepthDiff] = []
    prev = diff.prev_last_id
    next_id = diff.first_id
    for index in range(parts):
        chunk = levels[index * size : (index + 1) * size]
        last = next_id + 9
        out.append(
            DepthDiff(
                first_id=next_id,
                last_id=last,
                prev_last_id=prev,
                bids=[lv for is_bid, lv in chunk if is_bid],
                asks=[lv for is_bid, lv in chunk if not is_bid],
            )
        )
        prev, next_id = last, last + 1
    return out


# --- the book ---------------------------------------------------------------------------------


def test_book_basics_with_decimal_api() -> None:
    book = L2Book("binance", "BTC/USDT")
    book.apply_snapshot([("100.0", "1"), ("99.5", "2")], [("101", "3"), ("102", "4")], sequence=7)
    assert book.best_bid() == (Decimal("100.0"), Decimal("1"))
    assert book.best_ask() == (Decimal("101"), Decimal("3"))
    assert book.mid() == Decimal("100.5")
    assert book.spread() == Decimal("1.0")
    book.update(Side.BUY, "100.00", "5")  # another spelling of the same price is the same level
    assert book.bid_count == 2
    assert book.best_bid() == (Decimal("100.00"), Decimal("5"))
    book.update_bid(Decimal("100"), 0)
    assert book.best_bid_price() == Decimal("99.5")
    book.update_ask("100.5", "1")
    assert book.top(2) == (
        [(Decimal("99.5"), Decimal("2"))],
        [(Decimal("100.5"), Decimal("1")), (Decimal("101"), Decimal("3"))],
    )
    book.update_ask("999", "0")  # removing an absent level is a no-op
    assert book.ask_count == 3
    snap = book.snapshot(depth=1)
    assert snap.best_bid is not None
    assert snap.best_bid.price == Decimal("99.5")
    assert snap.sequence == 7
    assert not book.is_crossed()


def test_recorded_snapshot_loads() -> None:
    bids, asks, last_id = _snapshot()
    book = L2Book("binance", "BTC/USDT:USDT")
    sync = DepthSynchronizer(book, futures=True)
    sync.on_snapshot(bids, asks, last_id)
    assert book.bid_count == 100
    assert book.best_bid() == (Decimal("20377.00"), Decimal("1.770"))
    assert book.bids(3)[-1] == (Decimal("20376.80"), Decimal("0.009"))


def test_recorded_diff_ten_minutes_after_the_snapshot_is_a_gap() -> None:
    # The recording's diff (U=2098041693435) is 20 M ids after the snapshot (2098021528332): applying
    # it would corrupt the book, and the straddle rule says so.
    bids, asks, last_id = _snapshot()
    sync = DepthSynchronizer(L2Book(), futures=True)
    sync.on_snapshot(bids, asks, last_id)
    with pytest.raises(BookGapError) as info:
        sync.on_diff(_recorded_diff())
    assert info.value.retryable
    assert sync.needs_snapshot
    assert sync.gaps == 1


def test_recorded_diff_applies_to_a_straddling_snapshot() -> None:
    bids, asks, _ = _snapshot()
    diff = _recorded_diff()
    book = L2Book()
    sync = DepthSynchronizer(book)  # futures decided from pu
    sync.on_snapshot(bids, asks, diff.first_id + 5)
    assert sync.on_diff(diff) is True
    assert book.sequence == diff.last_id
    live_asks = [Decimal(p) for p, q in diff.asks if Decimal(q) > 0]
    assert book.best_ask_price() == min(live_asks)  # the snapshot had no asks
    assert book.ask_count == len(set(live_asks))
    assert not book.is_crossed()
    expected_bids = {Decimal(p): Decimal(q) for p, q in bids}
    for price, qty in diff.bids:
        if Decimal(qty) == 0:
            expected_bids.pop(Decimal(price), None)
        else:
            expected_bids[Decimal(price)] = Decimal(qty)
    assert book.as_dicts()[0] == expected_bids


def test_buffered_diffs_replayed_and_stale_ones_dropped() -> None:
    bids, asks, _ = _snapshot()
    chain = _split_chain(_recorded_diff(), 10)
    book = L2Book()
    sync = DepthSynchronizer(book, futures=True)
    for diff in chain[:6]:
        assert sync.on_diff(diff) is False  # buffered: no snapshot yet
    snapshot_id = chain[2].first_id + 3  # inside diff 2: diffs 0, 1 are stale, 2 straddles
    applied = sync.on_snapshot(bids, asks, snapshot_id)
    assert applied == 4
    assert sync.in_sync
    for diff in chain[6:]:
        assert sync.on_diff(diff) is True
    assert book.sequence == chain[-1].last_id


def test_dropped_diff_detected_then_resnapshot_equals_book_from_scratch() -> None:
    bids, asks, _ = _snapshot()
    chain = _split_chain(_recorded_diff(), 10)
    start = chain[0].first_id

    # Reference: everything applied in order.
    reference = L2Book()
    ref_sync = DepthSynchronizer(reference, futures=True)
    ref_sync.on_snapshot(bids, asks, start)
    for diff in chain:
        ref_sync.on_diff(diff)

    book = L2Book()
    sync = DepthSynchronizer(book, futures=True)
    sync.on_snapshot(bids, asks, start)
    for diff in chain[:4]:
        sync.on_diff(diff)
    with pytest.raises(BookGapError):
        sync.on_diff(chain[5])  # chain[4] was lost
    assert sync.needs_snapshot
    # A fresh snapshot as the venue would serve it after diff 6 (the reference's state then).
    at_six = L2Book()
    six_sync = DepthSynchronizer(at_six, futures=True)
    six_sync.on_snapshot(bids, asks, start)
    for diff in chain[:7]:
        six_sync.on_diff(diff)
    sync.on_diff(chain[6])  # arrives while waiting: buffered
    sync.on_diff(chain[7])
    rebuilt_bids, rebuilt_asks = at_six.bids(), at_six.asks()
    sync.on_snapshot(rebuilt_bids, rebuilt_asks, chain[6].last_id)
    for diff in chain[8:]:
        assert sync.on_diff(diff)
    assert book.as_dicts() == reference.as_dicts()
    assert book.sequence == reference.sequence


def test_spot_rules_first_diff_straddles_last_plus_one_then_contiguous() -> None:
    book = L2Book()
    sync = DepthSynchronizer(book, futures=False)
    sync.on_snapshot([("10", "1")], [("11", "1")], 100)
    assert sync.on_diff(DepthDiff(95, 100, [("10", "2")], [])) is False  # u <= lastUpdateId: dropped
    assert sync.on_diff(DepthDiff(99, 103, [("10", "3")], [])) is True  # 99 <= 101 <= 103
    assert sync.on_diff(DepthDiff(104, 104, [], [("11", "0")])) is True
    assert book.best_ask() is None
    with pytest.raises(BookGapError):
        sync.on_diff(DepthDiff(106, 107, [], []))


def test_spot_first_diff_after_snapshot_gap() -> None:
    sync = DepthSynchronizer(L2Book(), futures=False)
    sync.on_snapshot([], [], 100)
    with pytest.raises(BookGapError):
        sync.on_diff(DepthDiff(102, 105, [], []))


def test_futures_continuity_uses_pu_not_u_plus_one() -> None:
    book = L2Book()
    sync = DepthSynchronizer(book, futures=True)
    sync.on_snapshot([("10", "1")], [("11", "1")], 100)
    assert sync.on_diff(DepthDiff(90, 105, [("10", "2")], [], prev_last_id=89))
    # U jumps (futures ids are not contiguous) but pu == previous u: fine.
    assert sync.on_diff(DepthDiff(120, 130, [("10", "3")], [], prev_last_id=105))
    with pytest.raises(BookGapError):
        sync.on_diff(DepthDiff(140, 150, [], [], prev_last_id=131))


def test_tardis_snapshots_load_uncrossed() -> None:
    path = TARDIS / "binance-futures_book_snapshot_25_BTCUSDT.csv"
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    book = L2Book("binance", "BTC/USDT:USDT")
    for row in rows:
        bids = [(row[f"bids[{i}].price"], row[f"bids[{i}].amount"]) for i in range(25)]
        asks = [(row[f"asks[{i}].price"], row[f"asks[{i}].amount"]) for i in range(25)]
        book.apply_snapshot(bids, asks)
        assert (book.bid_count, book.ask_count) == (25, 25)
        assert not book.is_crossed()
        assert book.best_bid() == (Decimal(bids[0][0]), Decimal(bids[0][1]))
        assert book.best_ask() == (Decimal(asks[0][0]), Decimal(asks[0][1]))
        assert [p for p, _ in book.bids(25)] == [Decimal(p) for p, _ in bids]


# --- properties -------------------------------------------------------------------------------

_ticks = st.integers(min_value=1, max_value=400)
_qty = st.integers(min_value=0, max_value=5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), _ticks, _qty), max_size=300))
def test_top_is_max_min_of_the_levels(updates: list[tuple[bool, int, int]]) -> None:
    book = L2Book()
    model_bids: dict[Decimal, Decimal] = {}
    model_asks: dict[Decimal, Decimal] = {}
    for is_bid, tick, qty in updates:
        price = Decimal(tick) / 10
        target = model_bids if is_bid else model_asks
        if qty:
            target[price] = Decimal(qty)
        else:
            target.pop(price, None)
        (book.update_bid if is_bid else book.update_ask)(str(price), str(qty))
        best_bid = book.best_bid()
        best_ask = book.best_ask()
        assert (best_bid[0] if best_bid else None) == (max(model_bids) if model_bids else None)
        assert (best_ask[0] if best_ask else None) == (min(model_asks) if model_asks else None)
    assert book.as_dicts() == (model_bids, model_asks)
    assert [p for p, _ in book.bids()] == sorted(model_bids, reverse=True)
    assert [p for p, _ in book.asks()] == sorted(model_asks)


@st.composite
def _consistent_sequences(draw: st.DrawFn) -> list[tuple[bool, int, int]]:
    """Updates as a matching engine would publish them: a bid at or above the best ask removes the
    asks it crosses first (and vice versa), so the venue's book is never crossed after a message."""
    raw = draw(st.lists(st.tuples(st.booleans(), _ticks, st.integers(min_value=1, max_value=5)), max_size=200))
    bids: dict[int, int] = {}
    asks: dict[int, int] = {}
    out: list[tuple[bool, int, int]] = []
    for is_bid, tick, qty in raw:
        same, other = (bids, asks) if is_bid else (asks, bids)
        crossing = sorted(p for p in other if (p <= tick if is_bid else p >= tick))
        for p in crossing:
            del other[p]
            out.append((not is_bid, p, 0))
        same[tick] = qty
        out.append((is_bid, tick, qty))
    return out


@settings(max_examples=200, deadline=None)
@given(_consistent_sequences())
def test_consistent_sequence_never_leaves_the_book_crossed(updates: list[tuple[bool, int, int]]) -> None:
    book = L2Book()
    sync = DepthSynchronizer(book, futures=False)
    sync.on_snapshot([], [], 0)
    for seq, (is_bid, tick, qty) in enumerate(updates, start=1):
        level = [(str(Decimal(tick) / 10), str(qty))]
        sync.on_diff(DepthDiff(seq, seq, level if is_bid else [], [] if is_bid else level))
        # A crossing level is preceded by the removals it implies, so after each removal+insert pair
        # the book is uncrossed; check after every message that is not an intermediate removal.
        if qty:
            assert not book.is_crossed()
