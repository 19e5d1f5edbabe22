"""A TCP proxy in front of an MQTT broker that can go half-dead like a faulty middlebox:
after :meth:`MqttProxy.stall`, the connections open at that moment stop carrying PUBLISH
packets from the broker to the client, while everything else (PINGRESP, PUBACK, SUBACK) and
the client's own packets still pass. Keepalive is satisfied; no data arrives. Connections made
later work normally, so a client that reconnects recovers."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import Counter

PUBLISH, PINGRESP = 3, 13


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def read_packet(sock: socket.socket) -> bytes:
    """One MQTT control packet: fixed header (type byte, variable-length remaining length) and body."""
    first = _read_exact(sock, 1)
    header, length, shift = first, 0, 0
    while True:
        byte = _read_exact(sock, 1)
        header += byte
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    return header + _read_exact(sock, length)


def _close_both(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class MqttProxy:
    def __init__(self, broker_host: str, broker_port: int) -> None:
        self.broker = (broker_host, broker_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.host = "127.0.0.1"
        self._next_id = 0
        self._open: set[int] = set()
        self._stalled: set[int] = set()
        self.dropped = Counter[int]()  # packet types dropped on stalled connections
        self.passed_while_stalled = Counter[int]()  # packet types forwarded on stalled connections
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> int:
        """Stop broker-to-client PUBLISH on every connection open now; returns how many."""
        with self._lock:
            self._stalled |= self._open
            return len(self._open)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.broker)
            with self._lock:
                self._next_id += 1
                conn = self._next_id
                self._open.add(conn)
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._downstream, args=(conn, upstream, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close_both(src, dst)

    def _downstream(self, conn: int, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                packet = read_packet(src)
                kind = packet[0] >> 4
                with self._lock:
                    stalled = conn in self._stalled
                if stalled and kind == PUBLISH:
                    self.dropped[kind] += 1
                    continue
                if stalled:
                    self.passed_while_stalled[kind] += 1
                dst.sendall(packet)
        except (OSError, ConnectionError):
            pass
        finally:
            with self._lock:
                self._open.discard(conn)
            _close_both(src, dst)

    def close(self) -> None:
        self.server.close()
