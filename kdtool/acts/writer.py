"""Writing shards while the teacher runs (cache-acts): the resume point in the manifest, and a writer thread.

`TrackedWriter` is a ShardWriter (kdtool/acts/store.py) whose manifest also records `resume_from`,
where in the batch stream the first row not yet in a complete shard came from; kdtool/acts/caching.py
restarts there. `BackgroundWriter` runs it on a thread so the next forward overlaps the writes.
"""

from __future__ import annotations

import queue
import threading

from kdtool.acts.store import ShardWriter


class TrackedWriter(ShardWriter):
    """A ShardWriter whose manifest also says where the next shard starts in the batch stream.

    Rows are added batch by batch; `spans` keeps, per batch, its index and the absolute cache
    row its kept rows start at (counting rows a resume discards). Every manifest write stores
    `resume_from` = {"batch": b, "row": r}: the first row not in a complete shard is row r of
    batch b. Resume skips b batches and discards r rows, whatever the outlier filter kept.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spans: list[tuple[int, int, int]] = []  # (batch index, first absolute row, end absolute row)
        self.next_batch = 0

    def add_batch(self, batch_index: int, start_row: int, kept_rows: int, acts: dict) -> None:
        self.spans.append((batch_index, start_row, start_row + kept_rows))
        self.next_batch = batch_index + 1
        self.add(acts)

    def write_manifest(self) -> None:
        done = self.tokens
        where = {"batch": self.next_batch, "row": 0}
        for batch, lo, hi in self.spans:
            if lo <= done < hi:
                where = {"batch": batch, "row": done - lo}
                break
        self.spans = [s for s in self.spans if s[2] > done]  # older spans can never be needed again
        self.info["resume_from"] = where
        super().write_manifest()


class BackgroundWriter:
    """Runs the writer on a thread so the next forward overlaps the shard writes (bounded queue)."""

    def __init__(self, writer: TrackedWriter, depth: int = 2):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kdtool-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.writer.add_batch(*item)
                except BaseException as exc:
                    self.error = exc

    def add(self, batch_index: int, start_row: int, kept_rows: int, acts: dict) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((batch_index, start_row, kept_rows, acts))

    def finish(self, close: bool) -> None:
        """Drain the queue; write the final partial shard if close."""
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        if close:  # every row is in; the last (partial) shard and the manifest that says so
            self.writer.info["complete"] = True
            self.writer.close()
