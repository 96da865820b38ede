"""app/payload_sinks.py against a real socket: what a hostile sink can cost a worker."""

from __future__ import annotations

import errno
import os
import socket
import threading

from app.payload_sinks import RESPONSE_LIMIT_BYTES, FileSink, HttpSink

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


def test_a_fifo_no_one_reads_is_refused_at_once_and_one_read_is_written(tmp_path):
    """PAYLOAD_LOG_FILE naming a FIFO with no reader: opening it for writing blocked
    until a reader came, so the worker hung at boot for ever, listening and never
    answering; now it raises (ENXIO) and the worker does not boot, saying why."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | FileSink] = []

    def open_sink() -> None:
        try:
            outcome.append(FileSink(str(fifo)))
        except OSError as err:
            outcome.append(err)

    opener = threading.Thread(target=open_sink, daemon=True)
    opener.start()
    opener.join(5)
    if opener.is_alive():  # unblock the stuck open so the thread ends with the test
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    assert outcome and isinstance(outcome[0], OSError), "opening the FIFO blocked"
    assert outcome[0].errno == errno.ENXIO

    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    sink = FileSink(str(fifo))
    sink.send({}, b"{}")
    assert os.read(reader, 100) == b"{}\n"
    sink.close()
    os.close(reader)
