"""A UDP relay between one device and the server that goes silent, both
ways, for a while once the device has sent a given number of bytes: the
link failing mid-upload, as a phone losing its network does."""

from __future__ import annotations

import socket
import threading
import time


class FlakyRelay:
    def __init__(self, server: tuple[str, int], cut_after: int, cut_for: float):
        self.server = server
        self.cut_after = cut_after
        self.cut_for = cut_for
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.front.settimeout(0.2)
        self.address = "%s:%d" % self.front.getsockname()
        self.upstream_bytes = 0
        self.cut_at: float | None = None
        # Device addresses seen: a reconnection comes from a new port.
        self.peers: list[tuple[str, int]] = []
        self._upstreams: dict[tuple[str, int], socket.socket] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._forward, daemon=True)]
        self._threads[0].start()

    def cut(self) -> bool:
        return self.cut_at is not None and time.monotonic() - self.cut_at < self.cut_for

    def _forward(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.front.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            upstream = self._upstreams.get(peer)
            if upstream is None:
                upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                upstream.connect(self.server)
                upstream.settimeout(0.2)
                self._upstreams[peer] = upstream
                self.peers.append(peer)
                back = threading.Thread(target=self._backward, args=(upstream, peer), daemon=True)
                back.start()
                self._threads.append(back)
            self.upstream_bytes += len(data)
            if self.upstream_bytes > self.cut_after and self.cut_at is None:
                self.cut_at = time.monotonic()
            if not self.cut():
                upstream.send(data)

    def _backward(self, upstream: socket.socket, peer) -> None:
        while not self._stop.is_set():
            try:
                data = upstream.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not self.cut():
                self.front.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        for s in [self.front, *self._upstreams.values()]:
            s.close()
