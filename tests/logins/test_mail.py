"""Verification and reset mail through a real local SMTP server (aiosmtpd on an ephemeral port,
STARTTLS with a self-signed certificate and AUTH required), on each store."""

from __future__ import annotations

import asyncio
import email
import re
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import Message
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from gateway.config import SmtpConfig
from gateway.errors import BadCredentials, LinkInvalid, Unverified
from gateway.logins import LoginService, Mailer
from tests.logins.conftest import BASE_URL, LoginsEnv

PASSWORD = "correct horse battery"
LINK = re.compile(re.escape(BASE_URL) + r"/portal/link/[A-Za-z0-9_-]{43}")


@dataclass
class MailServer:
    port: int
    inbox: asyncio.Queue[Message]
    logins: list[tuple[str, str]]
    cert: Path

    async def next_message(self) -> Message:
        async with asyncio.timeout(10):
            return await self.inbox.get()

    def config(self) -> SmtpConfig:
        return SmtpConfig(
            host="127.0.0.1",
            port=self.port,
            starttls=True,
            from_addr="AgentPay <billing@example.com>",
            username="mailer",
            password="smtp-secret",
        )

    def client_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


class _Handler:
    def __init__(self, inbox: asyncio.Queue[Message]) -> None:
        self.inbox = inbox

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.inbox.put_nowait(email.message_from_bytes(envelope.original_content, policy=default_policy))
        return "250 Message accepted"


@pytest.fixture(scope="session")
def smtp_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (cert.pem, key.pem)."""
    directory = tmp_path_factory.mktemp("smtp-tls")
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem")]
    cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subject, *files]
    subprocess.run(cmd, check=True, capture_output=True)
    return directory / "cert.pem", directory / "key.pem"


@pytest.fixture
async def mail_server(smtp_certificate: tuple[Path, Path]) -> AsyncIterator[MailServer]:
    cert, key = smtp_certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    logins: list[tuple[str, str]] = []

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if isinstance(data, LoginPassword):
            logins.append((data.login.decode(), data.password.decode()))
            return AuthResult(success=data.login == b"mailer" and data.password == b"smtp-secret")
        return AuthResult(success=False)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            _Handler(inbox),
            hostname="127.0.0.1",
            tls_context=tls,
            require_starttls=True,
            auth_required=True,
            authenticator=authenticate,
        ),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        yield MailServer(port, inbox, logins, cert)
    finally:
        server.close()
        await server.wait_closed()


async def mailing(env: LoginsEnv, mail_server: MailServer) -> LoginService:
    service = env.make(mailer=Mailer(mail_server.config(), tls_context=mail_server.client_tls()))
    await service.open()
    return service


def link_in(message: Message) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    found = LINK.findall(body.get_content())
    assert len(found) == 1, body.get_content()
    return str(found[0])


async def test_signup_with_smtp_mails_a_verification_link_that_verifies_the_address(
    env: LoginsEnv, mail_server: MailServer
) -> None:
    service = await mailing(env, mail_server)
    with structlog.testing.capture_logs() as logged:
        login = await service.signup("alice@example.com", PASSWORD)
        assert not login.verified
        message = await mail_server.next_message()
    assert message["To"] == "alice@example.com" and "billing@example.com" in message["From"]
    assert "Confirm" in message["Subject"]
    assert mail_server.logins == [("mailer", "smtp-secret")]  # over STARTTLS: the server requires it
    url = link_in(message)
    token = url.rsplit("/", 1)[1]
    assert token not in repr(logged)
    shown = await service.peek_link(token)
    assert shown is not None and shown.purpose == "verify" and shown.expires_at == env.clock.now + 2 * 24 * 3600
    verified = await service.redeem_link(token, None)
    assert verified.verified
    with pytest.raises(LinkInvalid):
        await service.redeem_link(token, None)


async def test_a_stranger_who_signed_up_with_someone_elses_address_cannot_sign_in_before_it_is_confirmed(
    env: LoginsEnv, mail_server: MailServer
) -> None:
    """Pre-account hijacking: the stranger would make keys on the account, the owner would take it
    over with a reset and top it up, and the stranger's keys would spend it."""
    service = await mailing(env, mail_server)
    await service.signup("victim@example.com", PASSWORD)
    await mail_server.next_message()  # the verification mail, in the victim's inbox
    with pytest.raises(Unverified):
        await service.authenticate("victim@example.com", PASSWORD, client="10.0.0.1")
    with pytest.raises(BadCredentials):  # a wrong password still says nothing more
        await service.authenticate("victim@example.com", "not the password", client="10.0.0.1")
    await service.request_reset("victim@example.com")  # the owner takes the address back
    token = link_in(await mail_server.next_message()).rsplit("/", 1)[1]
    assert (await service.redeem_link(token, "the owner's new password")).verified
    await service.authenticate("victim@example.com", "the owner's new password", client="10.0.0.1")


async def test_a_reset_link_by_mail_sets_a_new_password_and_ends_every_session(
    env: LoginsEnv, mail_server: MailServer
) -> None:
    service = await mailing(env, mail_server)
    login = await service.signup("alice@example.com", PASSWORD)
    await mail_server.next_message()  # the verification mail
    session_token, _ = await service.open_session(login)
    links_before = await env.spec.fetchval("SELECT COUNT(*) FROM login_links")
    await service.request_reset("nobody@example.com")  # says nothing, sends nothing
    assert await env.spec.fetchval("SELECT COUNT(*) FROM login_links") == links_before
    await service.request_reset("Alice@Example.com")
    message = await mail_server.next_message()
    assert "Reset" in message["Subject"]
    token = link_in(message).rsplit("/", 1)[1]
    shown = await service.peek_link(token)
    assert shown is not None and shown.purpose == "reset" and shown.expires_at == env.clock.now + 3600
    await service.redeem_link(token, "a brand new password")
    assert await service.session(session_token) is None
    await service.authenticate("alice@example.com", "a brand new password", client="10.0.0.1")
    assert mail_server.inbox.empty()


async def test_a_reset_link_expires_after_an_hour(env: LoginsEnv, mail_server: MailServer) -> None:
    service = await mailing(env, mail_server)
    await service.signup("alice@example.com", PASSWORD)
    await mail_server.next_message()
    await service.request_reset("alice@example.com")
    token = link_in(await mail_server.next_message()).rsplit("/", 1)[1]
    env.clock.advance(3600)
    with pytest.raises(LinkInvalid):
        await service.redeem_link(token, "a brand new password")


async def test_reset_mail_is_limited_to_three_an_hour_per_login(env: LoginsEnv, mail_server: MailServer) -> None:
    service = await mailing(env, mail_server)
    await service.signup("alice@example.com", PASSWORD)
    await mail_server.next_message()
    for _ in range(5):
        await service.request_reset("alice@example.com")
    for _ in range(3):
        await mail_server.next_message()
    assert await env.spec.fetchval("SELECT COUNT(*) FROM login_links WHERE purpose = 'reset'") == 3


async def test_a_failing_mail_server_does_not_fail_the_signup(env: LoginsEnv, mail_server: MailServer) -> None:
    def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # no greeting: smtplib sees the server disconnect

    broken = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = broken.sockets[0].getsockname()[1]
    failing = SmtpConfig(host="127.0.0.1", port=port, starttls=False, from_addr=mail_server.config().from_addr)
    service = env.make(mailer=Mailer(failing))
    await service.open()
    try:
        with structlog.testing.capture_logs() as logged:
            login = await service.signup("alice@example.com", PASSWORD)
            await service.close()  # waits for the mail task, which fails and is logged
    finally:
        broken.close()
        await broken.wait_closed()
    assert not login.verified
    assert [entry["event"] for entry in logged if entry["log_level"] == "warning"] == ["mail_failed"], logged
