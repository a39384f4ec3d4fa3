"""Telling a user about their money: a notice in the portal (always) and an e-mail when SMTP is
configured and the user's account name is an e-mail address (portal sign-ups are named by theirs).
Mail failures are logged and never stop the handler that noticed something."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import structlog

from gateway.config import SmtpConfig
from gateway.payments.store import PaymentsStore

log = structlog.get_logger("gateway.payments")
TIMEOUT_S = 30.0


class Notifier:
    def __init__(self, store: PaymentsStore, smtp: SmtpConfig | None) -> None:
        self._store = store
        self._smtp = smtp
        self.sent: list[tuple[str, str]] = []  # (to, subject) of mail sent by this process, newest last

    async def notify(self, user: str, kind: str, subject: str, message: str) -> None:
        await self._store.add_notice(user, kind, message)
        if self._smtp is None or "@" not in user:
            return
        mail = EmailMessage()
        mail["From"] = self._smtp.from_addr
        mail["To"] = user
        mail["Subject"] = subject
        mail["Date"] = formatdate(localtime=False)
        mail["Message-ID"] = make_msgid(domain=self._smtp.from_addr.rpartition("@")[2].rstrip(">") or None)
        mail.set_content(message + "\n")
        try:
            await asyncio.to_thread(self._send, mail)
        except (OSError, smtplib.SMTPException) as exc:
            log.warning("payments_mail_failed", kind=kind, error=f"{type(exc).__name__}: {exc}")
            return
        self.sent.append((user, subject))

    def _send(self, message: EmailMessage) -> None:
        assert self._smtp is not None
        with smtplib.SMTP(self._smtp.host, self._smtp.port, timeout=TIMEOUT_S) as smtp:
            if self._smtp.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self._smtp.username is not None and self._smtp.password is not None:
                smtp.login(self._smtp.username, self._smtp.password)
            smtp.send_message(message)
