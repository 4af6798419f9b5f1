"""Who is acting: passed from the HTTP layer down through every service call.

Services take a :class:`Requester` rather than a bare user ID so later layers
(audit trail, attribute-based policies, rate limits by IP) have the whole picture
at the point where an action happens.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Requester:
    user_id: str
    device_id: str | None
    is_admin: bool = False
    ip: str | None = None
    user_agent: str | None = None

    @property
    def device_key(self) -> tuple[str, str] | None:
        return (self.user_id, self.device_id) if self.device_id is not None else None


# The address and user agent of the client whose request is being handled (set by the
# HTTP layer): new sessions record them as their first "last seen".
current_client: ContextVar[tuple[str | None, str | None]] = ContextVar("current_client", default=(None, None))


def system_requester(user_id: str) -> Requester:
    """A requester for actions the server takes on a user's behalf (e.g. deactivation)."""
    return Requester(user_id=user_id, device_id=None, is_admin=True, ip=None)
