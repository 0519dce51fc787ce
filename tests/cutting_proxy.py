"""A TCP proxy on loopback that cuts a connection at a chosen statement: a network failure.

Armed with a statement's bytes, it passes that statement on to the server
(or not), then closes both sides of that connection before the reply
arrives, so the client cannot tell whether the server acted on it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class CuttingProxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.trigger: bytes | None = None
        self.forward = True
        self.cut = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, trigger: bytes, *, forward: bool = True) -> None:
        """Cut the next connection that sends ``trigger``, after sending it on if ``forward``."""
        with self._lock:
            self.trigger, self.forward = trigger, forward
            self.cut.clear()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            pair = {"ends": (client, server), "cut": False}
            for source, sink, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pump, args=(source, sink, upstream, pair), daemon=True
                ).start()

    def _pump(self, source, sink, upstream: bool, pair: dict) -> None:
        try:
            while data := source.recv(65536):
                if not upstream and pair["cut"]:
                    continue  # the reply never reaches the client
                if upstream and self._fires(data):
                    pair["cut"] = True
                    if self.forward:
                        sink.sendall(data)
                        time.sleep(0.5)  # the server acts on it; its reply is lost
                    for end in pair["ends"]:
                        with contextlib.suppress(OSError):
                            end.shutdown(socket.SHUT_RDWR)
                        end.close()
                    self.cut.set()
                    return
                sink.sendall(data)
        except OSError:
            pass

    def _fires(self, data: bytes) -> bool:
        with self._lock:
            if self.trigger is None or self.trigger not in data:
                return False
            self.trigger = None
            return True
