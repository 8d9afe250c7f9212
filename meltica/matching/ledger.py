"""Balances per account and asset: free and locked, never negative."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

from meltica.matching.types import Account, EngineRejection, LedgerBalance, RejectReason

_ZERO = Decimal(0)


class Ledger:
    """Free/locked amounts. The engine moves money only through these methods.

    ``on_touch`` (set by the engine) hears every (account, asset) that changed, so results can list
    balance updates without scanning.
    """

    __slots__ = ("_balances", "on_touch")

    def __init__(self) -> None:
        self._balances: dict[tuple[Account, str], list[Decimal]] = {}
        self.on_touch: Callable[[Account, str], None] | None = None

    def _cell(self, account: Account, asset: str) -> list[Decimal]:
        cell = self._balances.get((account, asset))
        if cell is None:
            cell = [_ZERO, _ZERO]
            self._balances[(account, asset)] = cell
        return cell

    def _touched(self, account: Account, asset: str) -> None:
        if self.on_touch is not None:
            self.on_touch(account, asset)

    # --- public -----------------------------------------------------------------------------

    def deposit(self, account: Account, asset: str, amount: Decimal) -> LedgerBalance:
        if amount < 0:
            raise EngineRejection.of(RejectReason.INVALID_PARAMETERS, f"deposit {amount} is negative")
        cell = self._cell(account, asset)
        cell[0] += amount
        self._touched(account, asset)
        return LedgerBalance(cell[0], cell[1])

    def withdraw(self, account: Account, asset: str, amount: Decimal) -> LedgerBalance:
        cell = self._cell(account, asset)
        if amount < 0 or amount > cell[0]:
            raise EngineRejection.of(
                RejectReason.INSUFFICIENT_BALANCE, f"{account}: cannot withdraw {amount} {asset} (free {cell[0]})"
            )
        cell[0] -= amount
        self._touched(account, asset)
        return LedgerBalance(cell[0], cell[1])

    def balance(self, account: Account, asset: str) -> LedgerBalance:
        cell = self._balances.get((account, asset))
        return LedgerBalance(_ZERO, _ZERO) if cell is None else LedgerBalance(cell[0], cell[1])

    def balances(self, account: Account) -> dict[str, LedgerBalance]:
        return {asset: LedgerBalance(c[0], c[1]) for (acct, asset), c in self._balances.items() if acct == account}

    def accounts(self) -> list[Account]:
        return list(dict.fromkeys(acct for acct, _ in self._balances))

    def total(self, account: Account, asset: str) -> Decimal:
        """``free + locked`` of ``balance(account, asset)``."""
        cell = self._balances.get((account, asset))
        return _ZERO + _ZERO if cell is None else cell[0] + cell[1]

    def free(self, account: Account, asset: str) -> Decimal:
        cell = self._balances.get((account, asset))
        return _ZERO if cell is None else cell[0]

    # --- engine-internal moves ----------------------------------------------------------------

    def lock(self, account: Account, asset: str, amount: Decimal) -> None:
        cell = self._cell(account, asset)
        if amount > cell[0]:
            raise EngineRejection.of(
                RejectReason.INSUFFICIENT_BALANCE,
                f"Account has insufficient balance for requested action: needs {amount} {asset}, free {cell[0]}",
            )
        if amount == 0:
            return
        cell[0] -= amount
        cell[1] += amount
        self._touched(account, asset)

    def unlock(self, account: Account, asset: str, amount: Decimal) -> None:
        if amount == 0:
            return
        cell = self._cell(account, asset)
        assert amount <= cell[1], f"unlock {amount} {asset} > locked {cell[1]}"
        cell[1] -= amount
        cell[0] += amount
        self._touched(account, asset)

    def spend_locked(self, account: Account, asset: str, amount: Decimal) -> None:
        cell = self._cell(account, asset)
        assert amount <= cell[1], f"spend {amount} {asset} > locked {cell[1]}"
        cell[1] -= amount
        self._touched(account, asset)

    def credit(self, account: Account, asset: str, amount: Decimal) -> None:
        cell = self._cell(account, asset)
        cell[0] += amount
        assert cell[0] >= 0, f"{account} {asset} would go negative"
        self._touched(account, asset)
