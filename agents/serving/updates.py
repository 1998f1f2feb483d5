"""What the serving writer queues: per-partition updates of users, and the seam to the worker that owns them.

An :class:`Update` holds every user a range of one partition's state log
changed, with absolute values as of the range's end; consecutive updates merge
(:meth:`Update.absorb`), which bounds the writer's backlog by users, not by
events.  :class:`LogSource` is all the writer may ask of the worker.
"""

from __future__ import annotations

from typing import Protocol

# user_id -> (state index, last activity, signup ts | None, channel | None, lifetime revenue minor units)
Users = dict[str, tuple[int, int, "int | None", "str | None", int]]



class Update:
    """Every user a range ``[start, end)`` of one partition's state log changed, with values as of ``end``."""

    __slots__ = ("start", "end", "users")

    def __init__(self, start: int, end: int, users: Users) -> None:
        self.start = start
        self.end = end
        self.users = users

    def absorb(self, later: Update) -> None:
        """Merge the next update of the chain (``later.start == self.end``) into this one."""
        users = self.users
        for uid, v in later.users.items():
            if v[2] is None:
                old = users.get(uid)
                if old is not None and old[2] is not None:  # the first signup is kept once seen
                    v = (v[0], v[1], old[2], old[3], v[4])
            users[uid] = v
        self.end = later.end

    def __repr__(self) -> str:
        return f"Update({self.start}, {self.end}, {len(self.users)} users)"


class LogSource(Protocol):
    """What the writer needs from the worker that owns the partitions: the seam between serving and ingest."""

    def owns(self, partition: int) -> bool:
        """Whether the worker currently owns ``partition`` of the input."""
        ...

    async def replay_users(self, partition: int) -> tuple[dict[str, list], int]:
        """Every user of ``partition`` as of the end of its state log (engine ``take_touched`` format) and
        the state-log position reached; see agents/worker/recovery.py ``replay_users``."""
        ...
