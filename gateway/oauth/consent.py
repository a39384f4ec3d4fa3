"""The consent form's ``csrf_token``: a ticket signed by the gateway that binds an approval to the
signed-in person and to the exact authorization request shown to them.

The portal's session cookie is scoped to ``/portal``, so the form's POST to ``/oauth/authorize``
carries no session: the ticket is what proves that the person signed in to the portal saw this
request on our consent page. Another site cannot mint one (HMAC-SHA256 with the gateway's secret);
it names the request's parameters (a digest), the session, the login and the ledger user, and it
expires after ``TICKET_TTL_S``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass

TICKET_TTL_S = 600.0
#: The authorization request's parameters, carried as hidden fields by the consent form.
REQUEST_FIELDS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
    "resource",
    "scope",
)


@dataclass(frozen=True, slots=True)
class Consenter:
    session_id: str
    login_id: str
    user: str


def request_params(source: Mapping[str, str]) -> dict[str, str]:
    return {name: source[name] for name in REQUEST_FIELDS if name in source}


def _digest(params: Mapping[str, str]) -> str:
    canonical = json.dumps(request_params(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "backslashreplace")).hexdigest()


class Tickets:
    def __init__(self, secret: bytes) -> None:
        self._key = hashlib.sha256(b"agentpay oauth consent\x00" + secret).digest()

    def issue(self, who: Consenter, params: Mapping[str, str], now: float) -> str:
        payload = json.dumps(
            {"s": who.session_id, "l": who.login_id, "u": who.user, "p": _digest(params), "e": now + TICKET_TTL_S},
            separators=(",", ":"),
        ).encode()
        body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
        return f"{body}.{self._sign(body)}"

    def check(self, ticket: str, params: Mapping[str, str], now: float) -> Consenter | None:
        """Who approved, when ``ticket`` is ours, unexpired and for exactly these parameters."""
        body, _, signature = ticket.partition(".")
        if not body or not hmac.compare_digest(self._sign(body).encode(), signature.encode("utf-8", "replace")):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            who = Consenter(str(data["s"]), str(data["l"]), str(data["u"]))
            expires, digest = float(data["e"]), str(data["p"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires <= now or not hmac.compare_digest(digest, _digest(params)):
            return None
        return who

    def _sign(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
