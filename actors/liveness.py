"""Ray's view of an actor's life: its state in the GCS actor table, and how long a restarting actor is waited for."""

from __future__ import annotations

import re
import time
from typing import Any

import ray

RESTART_WAIT_S = 300.0  # how long a dead actor may take to come back before its replica is given up
PING_BACKOFF_S = (0.2, 5.0)  # the first and the longest wait between pings of a restarting actor


def actor_state(actor: Any) -> str | None:
    """Ray's own view of an actor (ALIVE, RESTARTING, DEAD, ...) from the GCS actor table, or None when it cannot
    be read (the table is Ray's internal API; then a restarting actor is waited for up to RESTART_WAIT_S)."""
    try:
        from ray._private.state import state

        return state.actor_table(actor._actor_id.hex()).get("State")
    except Exception:
        return None


def wait_alive(actors: list[Any]) -> bool:
    """Block until every actor answers a ping; False when Ray says one is dead for good or RESTART_WAIT_S passes."""
    deadline, backoff = time.monotonic() + RESTART_WAIT_S, PING_BACKOFF_S[0]
    for actor in actors:
        while True:
            try:
                ray.get(actor.ping.remote(), timeout=30)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if actor_state(actor) == "DEAD" or time.monotonic() > deadline:
                    return False
                time.sleep(backoff)
                backoff = min(2 * backoff, PING_BACKOFF_S[1])
    return True


def last_line(error: Exception) -> str:
    """The last line of a Ray error's message (where the cause is), without colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", getattr(error, "error_msg", None) or str(error)).strip()
    return text.splitlines()[-1] if text else type(error).__name__
