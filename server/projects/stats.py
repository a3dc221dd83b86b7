"""What a project's annotations add up to: objects per class, images per tag (the console's project page).

A project's items are never changed or removed, only added (pages appended), so its numbers are
counted once per item count and kept (a few projects, most recent first): counting reads every
annotation, which takes a while on a big project, and an append changes the count, which makes
the kept numbers stale.
"""

from __future__ import annotations

import collections
import threading

from sqlalchemy import select

from server import db

KEEP = 32


def count(conn, pid: int) -> dict:
    """{items, labelled, objects, classes: {title: {objects, items}}, tags: {name: images},
    object_tags: {name: objects}} over every item of project `pid`."""
    c = db.project_items.c
    classes: dict[str, dict] = {}
    tags: collections.Counter = collections.Counter()
    object_tags: collections.Counter = collections.Counter()
    items = labelled = objects = 0
    for (ann,) in conn.execute(select(c.ann).where(c.project_id == pid).order_by(c.id)):
        items += 1
        objs = (ann or {}).get("objects") or []
        labelled += bool(objs)
        objects += len(objs)
        seen = set()
        for o in objs:
            title = o.get("classTitle", "")
            k = classes.setdefault(title, {"objects": 0, "items": 0})
            k["objects"] += 1
            if title not in seen:
                seen.add(title)
                k["items"] += 1
            object_tags.update({t.get("name", "") for t in o.get("tags") or []})
        tags.update({t.get("name", "") for t in (ann or {}).get("tags") or []})
    return {
        "items": items,
        "labelled": labelled,
        "objects": objects,
        "classes": classes,
        "tags": dict(tags),
        "object_tags": dict(object_tags),
    }


class StatsCache:
    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self._lock = threading.Lock()
        self._done: collections.OrderedDict[int, tuple[tuple[int, int], dict]] = collections.OrderedDict()

    def get(self, engine, pid: int, version: tuple[int, int]) -> dict:
        """The numbers of project `pid` at `version` (its item count and revision, read before this
        call; numbers kept under another version are counted afresh). Blocking: call it in a thread."""
        with self._lock:
            kept = self._done.get(pid)
            if kept is not None and kept[0] == version:
                self._done.move_to_end(pid)
                return kept[1]
        with engine.connect() as conn:
            stats = count(conn, pid)
        with self._lock:
            # Kept under the version read before counting: a page added or an annotation changed
            # while counting makes the next request's version differ, so it counts afresh.
            self._done[pid] = (version, stats)
            self._done.move_to_end(pid)
            while len(self._done) > self.keep:
                self._done.popitem(last=False)
        return stats
