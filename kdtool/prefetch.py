"""Run an iterator on a thread a few items ahead, so producing the next item overlaps using this one.

Used where a pipeline stage waits on another that releases the GIL: cache-acts tokenises and
packs the next batches while the teacher runs (kdtool/acts/caching.py), and train-sae --stream
runs the teacher one block ahead while the SAEs train (kdtool/sae/mixing.py). torch kernels and
the fast tokenizer's batch encoding release the GIL, so the two really run side by side.

Errors raised by the producer are raised in the consumer, at the item where they happened.
`close()` (also on leaving a `for` loop early, through the generator's cleanup) stops the
thread after the item it is producing.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_END, _ITEM, _ERROR = range(3)


class Background:
    """Iterate `source` on a thread, at most `depth` items ahead of the consumer.

    context: entered on the thread around the whole iteration (e.g. torch.no_grad, a CUDA stream).
    ready: called on the thread with each item before it is handed over (e.g. wait for its kernels).
    receive: called on the consumer's thread with each item as it arrives.
    """

    def __init__(
        self,
        source: Iterable,
        depth: int = 1,
        *,
        name: str = "kdtool-prefetch",
        context: Callable[[], contextlib.AbstractContextManager] | None = None,
        ready: Callable[[Any], None] | None = None,
        receive: Callable[[Any], None] | None = None,
    ):
        self.q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self.stop = threading.Event()
        self.ready, self.receive = ready, receive
        self.context = context or contextlib.nullcontext
        self.thread = threading.Thread(target=self._run, args=(iter(source),), name=name, daemon=True)
        self.thread.start()

    def _put(self, entry) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator) -> None:
        try:
            with self.context():
                for item in source:
                    if self.ready is not None:
                        self.ready(item)
                    if not self._put((_ITEM, item)):
                        return
            self._put((_END, None))
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((_ERROR, exc))

    def __iter__(self) -> Iterator:
        try:
            while True:
                kind, item = self.q.get()
                if kind == _END:
                    return
                if kind == _ERROR:
                    raise item
                if self.receive is not None:
                    self.receive(item)
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread (after its current item) and drop what it had queued."""
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.q.get_nowait()
            except queue.Empty:
                self.thread.join(timeout=0.1)
