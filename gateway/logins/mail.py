"""The portal's mail: verification and password-reset links over SMTP (the standard library's
smtplib, in a worker thread), STARTTLS when configured, credentials from the config (which reads
them from the environment). A link carries a sign-in secret: it is never logged."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import structlog

from gateway.config import SmtpConfig
from gateway.errors import Unavailable
from gateway.logins.models import Link

log = structlog.get_logger("gateway.logins")
TIMEOUT_S = 30.0

_SUBJECTS = {
    "verify": "Confirm your e-mail address for AgentPay",
    "reset": "Reset your AgentPay password",
    "invite": "Your AgentPay sign-in link",
}
_BODIES = {
    "verify": "Open this link to confirm that {email} is your address:",
    "reset": "Someone (we hope you) asked to reset the password of {email}. Open this link to choose a new one:",
    "invite": "You were invited to AgentPay as {email}. Open this link to choose your password:",
}


def link_message(link: Link, sender: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = link.email
    message["Subject"] = _SUBJECTS[link.purpose]
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2].rstrip(">") or None)
    expires = datetime.fromtimestamp(link.expires_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    message.set_content(
        _BODIES[link.purpose].format(email=link.email)
        + f"\n\n{link.url}\n\n"
        + f"The link works once and expires at {expires}. If you did not ask for it, ignore this message.\n"
    )
    return message


class Mailer:
    """Sends one-time links by SMTP."""

    def __init__(self, config: SmtpConfig, *, tls_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self._tls = tls_context

    async def send_link(self, link: Link) -> None:
        """Unavailable when the SMTP server cannot be reached or refuses the message."""
        message = link_message(link, self.config.from_addr)
        try:
            await asyncio.to_thread(self._send, message)
        except (OSError, smtplib.SMTPException) as exc:
            log.warning("mail_failed", purpose=link.purpose, error=f"{type(exc).__name__}: {exc}")
            raise Unavailable(
                f"could not send mail through {self.config.host}:{self.config.port}: {type(exc).__name__}",
                hint="Check the smtp settings and that the mail server is up",
            ) from exc
        log.info("mail_sent", purpose=link.purpose)

    def _send(self, message: EmailMessage) -> None:
        with smtplib.SMTP(self.config.host, self.config.port, timeout=TIMEOUT_S) as smtp:
            if self.config.starttls:
                smtp.starttls(context=self._tls or ssl.create_default_context())
            if self.config.username is not None and self.config.password is not None:
                smtp.login(self.config.username, self.config.password)
            smtp.send_message(message)
