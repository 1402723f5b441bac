"""Stream plumbing: writers that hand their work to a second thread, in bounded memory."""
from __future__ import annotations

import hashlib
import queue
import threading
from typing import Callable, Optional

_DONE = object()
MAX_PENDING_BYTES = 8 << 20


class BackgroundWriter:
    """Writes to a sink on a background thread, so that the sink's work (encryption, hashing, file writes)
    overlaps with the caller's (reading, compression). At most max_pending buffers wait in the queue, so memory
    stays bounded; order is kept. An error in the thread is raised by the next write() or by close().
    """

    def __init__(self, sink, max_pending: int = 16, name: str = "background-writer",
                 on_chunk: Optional[Callable[[bytes], None]] = None, max_bytes: int = MAX_PENDING_BYTES) -> None:
        self.sink = sink
        self.size = 0
        self._on_chunk = on_chunk
        self._queue: "queue.Queue" = queue.Queue(max_pending)
        # and at most max_bytes waiting (beyond one buffer): 16 incompressible 4 MiB zstd jobs would be 64 MiB
        self._max_bytes = max_bytes
        self._pending_bytes = 0
        self._room = threading.Condition()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            try:
                if self._error is None:  # else drain after a failure
                    if self._on_chunk is not None:
                        self._on_chunk(item)
                    self.sink.write(item)
            except BaseException as error:  # handed to the writer's thread
                self._error = error
            with self._room:
                self._pending_bytes -= len(item)
                self._room.notify()

    def write(self, data) -> int:
        if self._error is not None:
            raise self._error
        chunk = bytes(data)
        self.size += len(chunk)
        with self._room:
            while self._pending_bytes and self._pending_bytes + len(chunk) > self._max_bytes:
                self._room.wait()
            self._pending_bytes += len(chunk)
        self._queue.put(chunk)
        return len(chunk)

    def close(self) -> None:
        """Wait for every queued buffer to be written; raise what the thread hit. The sink stays open."""
        if not self._closed:
            self._closed = True
            self._queue.put(_DONE)
            self._thread.join()
        if self._error is not None:
            raise self._error


class HashingWriter(BackgroundWriter):
    """Counts, sha256-hashes and writes to a sink on a background thread (hashlib and file writes release the
    GIL, so they overlap with the caller's compression and encryption)."""

    def __init__(self, sink, max_pending: int = 16) -> None:
        self.digest = hashlib.sha256()
        super().__init__(sink, max_pending, "hashing-writer", self.digest.update)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()
