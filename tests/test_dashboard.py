"""The coordinator's dashboard: its HTTP server, and the page in a real headless browser
updating without a reload as rounds close."""

from __future__ import annotations

import http.client
import json
import re
import threading
from pathlib import Path
from typing import Any

from browser import run_chromium

from coordinator.dashboard import DashboardServer
from coordinator.fleet_view import FleetView
from federation import records
from ledger import ZERO_HASH, make_block


class Chain:
    """Blocks for a FleetView, as a coordinator would append them (unsigned: the view trusts its feeder)."""

    def __init__(self, view: FleetView) -> None:
        self.view = view
        self.prev = ZERO_HASH
        self.index = 0

    def add(self, data: dict[str, Any]) -> None:
        block = make_block(self.index, 1_700_000_000.0 + self.index, data, self.prev)
        self.view.add_block(block)
        self.prev, self.index = block.hash, self.index + 1

    def round(self, number: int, devices: list[str], mse: float) -> None:
        self.add(records.aggregate(number, devices, bytes(32), "fedavg",
                                   {"test_mse": mse, "clients_train_loss": mse * 1.1},
                                   merkle_root=bytes(32), num_samples=400 * len(devices)))
        self.add(records.round_opened(number + 1))


def status(round_number: int, state: str = "waiting", accepted: list[str] | None = None) -> dict[str, Any]:
    return {"fleet": "plant7", "round": round_number, "state": state, "accepted": accepted or [], "waiting_for": 2,
            "min_clients": 2, "height": 0, "head": "", "rejections": {"bad_signature": 3},
            "accepted_total": 2 * (round_number - 1), "presence": {"pump-01": "online", "pump-02": "offline"},
            "datasets": {}, "time": 1_700_000_000.0}


def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path, headers={"Host": host})
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def test_server_serves_page_and_snapshot_and_refuses_foreign_hosts() -> None:
    view = FleetView("plant7")
    chain = Chain(view)
    chain.add(records.round_opened(1))
    chain.add(records.update_rejected("pump-02", 1, "bad_metrics", bytes(32)))
    view.set_status(status(1))
    server = DashboardServer(view.snapshot).start()
    try:
        code, headers, body = get(server.port, "/")
        assert code == 200 and b"dashboard.js" in body
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        code, _, body = get(server.port, "/api/fleet")
        snapshot = json.loads(body)
        assert code == 200 and snapshot["status"]["round"] == 1
        assert snapshot["open_round"] == {"round": 1, "rejected": {"bad_metrics": 1}}
        assert snapshot["ledger"]["height"] == 2
        assert get(server.port, "/etc/passwd")[0] == 404
        # A page on another site, with its name rebound to 127.0.0.1, must not read the fleet.
        assert get(server.port, "/api/fleet", host="evil.example:8080")[0] == 403
        assert get(server.port, "/api/fleet", host=f"localhost:{server.port}")[0] == 200
    finally:
        server.stop()


def test_dashboard_updates_in_a_real_browser_without_reload(tmp_path: Path) -> None:
    view = FleetView("plant7")
    chain = Chain(view)
    chain.add(records.genesis("plant7", bytes(32)))
    chain.add(records.model_published(1, bytes(32), initial=True, task={"task": "california"}))
    chain.add(records.round_opened(1))
    view.set_status(status(1, accepted=["pump-01"]))
    polls = [0]
    lock = threading.Lock()

    def snapshot() -> dict[str, Any]:
        # Rounds close while the page is open: after its second poll, two rounds are aggregated.
        with lock:
            polls[0] += 1
            if polls[0] == 2:
                chain.round(1, ["pump-01", "pump-02"], 0.41)
                chain.add(records.update_rejected("pump-02", 2, "stale_round", bytes(32)))
                chain.round(2, ["pump-01", "pump-02"], 0.27)
                view.set_status(status(3, accepted=["pump-02"]))
        return view.snapshot()

    server = DashboardServer(snapshot).start()
    try:
        dom = run_chromium(f"http://127.0.0.1:{server.port}/", tmp_path, budget_ms=9000)
    finally:
        server.stop()
    assert server.requests["/"] == 1, "the page was loaded more than once"
    assert server.requests["/api/fleet"] >= 3, server.requests
    text = re.sub(r"<[^>]+>", " ", dom)
    # What only the later snapshots hold is on the page: it updated itself.
    assert re.search(r'id="round">3<', dom), dom[:3000]
    assert "round 3: 1 of 2 updates" in text
    assert "pump-02" in text and "offline" in text
    assert "stale_round 1" in text  # round 2's row: the rejection recorded while it was open
    assert "bad_signature" in text
    assert "test_mse" in text
    assert dom.count("<circle") == 2  # one point per aggregated round on the chart
