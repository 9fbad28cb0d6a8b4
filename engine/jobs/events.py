"""Job events: a per-job fan-out of progress and completion to any number of watchers."""

from __future__ import annotations

import queue
import threading

TERMINAL_EVENTS = frozenset({"done", "failed", "cancelled", "interrupted"})


class EventBus:
    """Per-job fan-out of events to any number of watchers; remembers the latest progress."""

    def __init__(self) -> None:
        self._subs: dict[str, list[queue.Queue]] = {}
        self._latest: dict[str, dict] = {}
        self._lock = threading.Lock()

    def subscribe(self, job_id: str) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._subs.setdefault(job_id, []).append(q)
            if job_id in self._latest:
                q.put(self._latest[job_id])
        return q

    def unsubscribe(self, job_id: str, q: queue.Queue) -> None:
        with self._lock:
            subs = self._subs.get(job_id, [])
            if q in subs:
                subs.remove(q)
            if not subs:
                self._subs.pop(job_id, None)

    def publish(self, job_id: str, event: dict) -> None:
        with self._lock:
            if event["type"] == "progress":
                self._latest[job_id] = event
            elif event["type"] in TERMINAL_EVENTS:
                self._latest.pop(job_id, None)
            subs = list(self._subs.get(job_id, []))
        for q in subs:
            q.put(event)

    def latest(self, job_id: str) -> dict | None:
        with self._lock:
            return self._latest.get(job_id)
