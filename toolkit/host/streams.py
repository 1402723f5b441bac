"""Stream plumbing: a writer that hashes and writes on a second thread, in bounded memory."""
from __future__ import annotations

import hashlib
import queue
import threading
from typing import Optional

_DONE = object()


class HashingWriter:
    """Counts, sha256-hashes and writes to a sink on a background thread.

    hashlib and file writes release the GIL, so they overlap with the caller's
    work (compression, encryption). At most max_pending buffers wait in the
    queue, so memory stays bounded. An error in the thread is raised by the
    next write() or by close().
    """

    def __init__(self, sink, max_pending: int = 16) -> None:
        self.sink = sink
        self.digest = hashlib.sha256()
        self.size = 0
        self._queue: "queue.Queue" = queue.Queue(max_pending)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="hashing-writer", daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is not None:
                continue  # drain after a failure
            try:
                self.digest.update(item)
                self.sink.write(item)
            except BaseException as error:  # handed to the writer's thread
                self._error = error

    def write(self, data) -> int:
        if self._error is not None:
            raise self._error
        chunk = bytes(data)
        self.size += len(chunk)
        self._queue.put(chunk)
        return len(chunk)

    def close(self) -> None:
        """Wait for every queued buffer to be written; raise what the thread hit."""
        if not self._closed:
            self._closed = True
            self._queue.put(_DONE)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def hexdigest(self) -> str:
        return self.digest.hexdigest()
