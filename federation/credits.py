"""Pay-per-prediction accounting as a pure fold over ledger records.

Three record types (see docs/predictions.md):

- ``credits.deposit``: the owner credits a client (``client``, ``amount``), carrying the
  owner's signed order (``order`` bytes, ``owner_sig``);
- ``prediction.receipt``: an answered request was charged (``client``, ``request_id``,
  ``rows``, ``fee``, ``round``, ``model_sha256``, ``request_sha256``, ``reply_sha256``, and
  for regression ``scaler_sha256``);
- ``credits.withdrawal``: the owner takes out collected fees (``amount``, ``order``,
  ``owner_sig``).

Rules: amounts are integers in the smallest unit (never floats); a client's balance
(deposits - fees) never goes below zero; a request id is charged once per client; an order
id is used once; withdrawals never exceed the fees collected minus what was withdrawn; the
owner's orders are signed by the owner key (the coordinator's signing key, named in the
genesis block). :class:`Accounts` checks a record (``check``, raises ``ValueError``) and then
folds it in (``apply``); :func:`fold` recomputes everything from a chain of blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

DEPOSIT = "credits.deposit"
WITHDRAWAL = "credits.withdrawal"
RECEIPT = "prediction.receipt"
TYPES = (DEPOSIT, WITHDRAWAL, RECEIPT)
ORDER_CONTEXT = b"fledger/credits-order/v1\n"  # the owner key also signs blocks: keep them apart
MAX_AMOUNT = 2**62  # fits every msgpack int; no total can overflow int64 in another verifier


def _int(data: dict[str, Any], name: str, low: int = 0) -> int:
    value = data.get(name)
    if type(value) is not int or not low <= value <= MAX_AMOUNT:
        raise ValueError(f"field {name!r} must be an integer in [{low}, 2**62]")
    return value


def _bytes(data: dict[str, Any], name: str, size: int) -> bytes:
    value = data.get(name)
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"field {name!r} must be {size} bytes")
    return value


def _str(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"field {name!r} must be a non-empty string")
    return value


def decode_order(order: bytes) -> dict[str, Any]:
    """The fields of an owner's signed order (msgpack map): fleet, action, amount, order_id,
    created, and client for a deposit."""
    try:
        fields = msgpack.unpackb(order, raw=False, strict_map_key=True, max_map_len=16)
    except Exception as exc:
        raise ValueError(f"order is not msgpack: {type(exc).__name__}") from None
    if not isinstance(fields, dict):
        raise ValueError("order is not a map")
    _str(fields, "fleet")
    if fields.get("action") not in ("deposit", "withdraw"):
        raise ValueError("order action must be deposit or withdraw")
    _int(fields, "amount", 1)
    _bytes(fields, "order_id", 16)
    if fields["action"] == "deposit":
        _str(fields, "client")
    return fields


@dataclass
class Accounts:
    """Balances, fees collected and withdrawn, and the ids already used."""

    balances: dict[str, int] = field(default_factory=dict)
    deposited: dict[str, int] = field(default_factory=dict)
    spent: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)  # answered requests per client
    collected: int = 0
    withdrawn: int = 0
    charged: dict[tuple[str, bytes], int] = field(default_factory=dict)  # (client, request id) -> receipt block
    orders: dict[bytes, int] = field(default_factory=dict)  # order id -> its block

    @property
    def held(self) -> int:
        """Fees collected and not yet withdrawn: what the owner may still withdraw."""
        return self.collected - self.withdrawn

    def balance(self, client: str) -> int:
        return self.balances.get(client, 0)

    def check(self, data: dict[str, Any], *, fleet: str = "",
              verify_order: Callable[[bytes, bytes], bool] | None = None) -> None:
        """Raise ValueError unless ``data`` (a record of one of :data:`TYPES`) may come next.

        ``verify_order(message, signature)`` checks the owner's signature (skipped if None)."""
        kind = data.get("type")
        if kind == RECEIPT:
            client = _str(data, "client")
            request_id = _bytes(data, "request_id", 16)
            _int(data, "rows", 1)
            fee = _int(data, "fee")
            _int(data, "round")
            for name in ("model_sha256", "request_sha256", "reply_sha256"):
                _bytes(data, name, 32)
            if "scaler_sha256" in data:  # regression: the standardisers that gave original units
                _bytes(data, "scaler_sha256", 32)
            if (client, request_id) in self.charged:
                raise ValueError(f"request {request_id.hex()} of {client!r} was already charged in block "
                                 f"{self.charged[(client, request_id)]}")
            if fee > self.balance(client):
                raise ValueError(f"fee {fee} exceeds the balance {self.balance(client)} of {client!r}")
            return
        if kind not in (DEPOSIT, WITHDRAWAL):
            raise ValueError(f"not a credits record: {kind!r}")
        amount = _int(data, "amount", 1)
        order = data.get("order")
        signature = data.get("owner_sig")
        if not isinstance(order, bytes) or not isinstance(signature, bytes) or len(signature) != 64:
            raise ValueError("an owner's record carries the signed order and a 64-byte owner_sig")
        fields = decode_order(order)
        if fields["action"] != ("deposit" if kind == DEPOSIT else "withdraw") or fields["amount"] != amount:
            raise ValueError("record differs from the owner's signed order")
        if fleet and fields["fleet"] != fleet:
            raise ValueError(f"order is for fleet {fields['fleet']!r}, not {fleet!r}")
        if fields["order_id"] in self.orders:
            raise ValueError(f"order {fields['order_id'].hex()} was already recorded in block "
                             f"{self.orders[fields['order_id']]}")
        if kind == DEPOSIT:
            if _str(data, "client") != fields["client"]:
                raise ValueError("record differs from the owner's signed order")
        elif amount > self.held:
            raise ValueError(f"withdrawal of {amount} exceeds the fees held ({self.collected} collected, "
                             f"{self.withdrawn} withdrawn)")
        if verify_order is not None and not verify_order(ORDER_CONTEXT + order, signature):
            raise ValueError("the order is not signed by the owner (the coordinator's key)")

    def apply(self, data: dict[str, Any], index: int = -1) -> None:
        """Fold in a record already checked (``index``: its block)."""
        kind = data["type"]
        if kind == RECEIPT:
            client, fee = data["client"], data["fee"]
            self.balances[client] = self.balance(client) - fee
            self.spent[client] = self.spent.get(client, 0) + fee
            self.requests[client] = self.requests.get(client, 0) + 1
            self.collected += fee
            self.charged[(client, data["request_id"])] = index
            return
        self.orders[decode_order(data["order"])["order_id"]] = index
        if kind == DEPOSIT:
            client = data["client"]
            self.balances[client] = self.balance(client) + data["amount"]
            self.deposited[client] = self.deposited.get(client, 0) + data["amount"]
        else:
            self.withdrawn += data["amount"]

    def summary(self) -> dict[str, Any]:
        clients = sorted(set(self.balances) | set(self.deposited))
        return {
            "clients": {c: {"deposited": self.deposited.get(c, 0), "spent": self.spent.get(c, 0),
                            "balance": self.balance(c), "requests": self.requests.get(c, 0)} for c in clients},
            "collected": self.collected, "withdrawn": self.withdrawn, "held": self.held,
        }


def fold(blocks: Iterable[Any]) -> Accounts:
    """Accounts recomputed from blocks (anything with ``.data`` and ``.index``), checking each
    credits record; ValueError names the first block that breaks a rule."""
    accounts = Accounts()
    fleet = ""
    for block in blocks:
        data = block.data
        if block.index == 0:
            fleet = str(data.get("fleet", ""))
        if data.get("type") in TYPES:
            try:
                accounts.check(data, fleet=fleet)
            except ValueError as exc:
                raise ValueError(f"block {block.index}: {exc}") from None
            accounts.apply(data, block.index)
    return accounts


def receipt(client: str, request_id: bytes, rows: int, fee: int, round_number: int, model_sha256: bytes,
            request_sha256: bytes, reply_sha256: bytes, **extra: Any) -> dict[str, Any]:
    """A receipt record: what was answered, with which model, and what it cost."""
    return {**extra, "type": RECEIPT, "client": client, "request_id": bytes(request_id), "rows": int(rows),
            "fee": int(fee), "round": int(round_number), "model_sha256": bytes(model_sha256),
            "request_sha256": bytes(request_sha256), "reply_sha256": bytes(reply_sha256)}


def owner_record(order: bytes, owner_sig: bytes, **extra: Any) -> dict[str, Any]:
    """A deposit or withdrawal record from the owner's signed order (fields copied from it)."""
    fields = decode_order(order)
    record = {**extra, "type": DEPOSIT if fields["action"] == "deposit" else WITHDRAWAL,
              "amount": fields["amount"], "order": bytes(order), "owner_sig": bytes(owner_sig)}
    if fields["action"] == "deposit":
        record["client"] = fields["client"]
    return record
