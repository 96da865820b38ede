"""app/payload_sinks.py against a real socket: what a hostile sink can cost a worker."""

from __future__ import annotations

import socket
import threading

from app.payload_sinks import RESPONSE_LIMIT_BYTES, HttpSink

STREAMED = 256 << 20  # what the sink offers as its answer: far more than any buffer


def test_a_sink_answering_a_huge_body_is_read_no_further_than_the_limit():
    """A sink that answers 200 with a 2 GB body (and streams it) is taken as having
    taken the record, but its body is read only up to RESPONSE_LIMIT_BYTES: reading
    it whole held it all in the worker (300 MB streamed, 300 MB more RSS)."""
    listener = socket.create_server(("127.0.0.1", 0))
    sent = []

    def answer() -> None:
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2000000000\r\n\r\n")
        total, chunk = 0, b"x" * (1 << 20)
        try:
            while total < STREAMED:
                connection.sendall(chunk)
                total += len(chunk)
        except OSError:  # the reader closed: what it took is what was sent
            pass
        sent.append(total)
        connection.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    sink = HttpSink(f"http://127.0.0.1:{listener.getsockname()[1]}/", 5.0, "test")
    sink.send({"request_id": "r", "time": "t", "model": "m", "version": 1}, b"{}")
    thread.join(10)
    listener.close()
    assert RESPONSE_LIMIT_BYTES < 1 << 20
    assert sent and sent[0] < STREAMED // 4, f"the sink pushed {sent} bytes into the worker"
