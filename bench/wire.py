"""A TCP relay on 127.0.0.1 that counts the bytes going each way.

Put between a client and a server (the client is given the relay's URL), it measures what a
poll costs on the wire: every byte of HTTP the client sends and receives, headers included.
TCP/IP headers, handshakes and ACKs are not application bytes and are not counted.
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["CountingRelay"]

_READ = 65536


class CountingRelay:
    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self._lock = threading.Lock()
        self.sent = 0  # client → server
        self.received = 0  # server → client
        self.connections = 0
        self.captured: list[tuple[str, bytes]] = []  # ("up" | "down", bytes), in order
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        accept.start()
        self._threads.append(accept)

    def reset(self) -> None:
        with self._lock:
            self.sent = self.received = self.connections = 0
            self.captured = []

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            for source, sink, direction in ((client, upstream, "up"), (upstream, client, "down")):
                thread = threading.Thread(
                    target=self._pump, args=(source, sink, direction), daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        while True:
            try:
                data = source.recv(_READ)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            with self._lock:
                if direction == "up":
                    self.sent += len(data)
                else:
                    self.received += len(data)
                self.captured.append((direction, data))
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
