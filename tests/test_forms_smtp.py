"""Double opt-in mail over an encrypted, authenticated SMTP connection (STARTTLS and TLS).

The SMTP server is aiosmtpd with a certificate of a test CA (trustme) and a login; Kilde trusts
the CA through SSL_CERT_FILE, as a company would with its own CA, and refuses anything else.
"""

from __future__ import annotations

import email
import re
import ssl
import time
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.conftest import Server, free_port, start_server
from tests.test_forms import csrf_of, identify_with, ledger

USER = "kilde-mailer"
PASSWORD = "correct horse battery staple"


class SecureInbox:
    """Keeps each message with how it was delivered: over TLS or not, and as whom."""

    def __init__(self) -> None:
        self.messages: list[tuple[Message, bool, str | None]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        login = session.auth_data if session.authenticated else None
        # STARTTLS sets session.ssl; implicit TLS shows on the connection itself.
        tls = session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None
        self.messages.append((email.message_from_bytes(envelope.content), tls, login))
        return "250 OK"

    def wait(self, count: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)


def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False, auth_data=USER if ok else None)


@pytest.fixture(scope="module", params=["starttls", "ssl"])
def secure_mail(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, SecureInbox, str]]:
    mode: str = request.param
    base = tmp_path_factory.mktemp(f"smtp-{mode}")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = base / "company-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    inbox = SecureInbox()
    port = free_port()
    tls: dict[str, Any] = (
        {"tls_context": context, "require_starttls": True}
        if mode == "starttls"
        # aiosmtpd offers AUTH over implicit TLS only when told the connection is safe.
        else {"ssl_context": context, "auth_require_tls": False}
    )
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        authenticator=authenticate,
        auth_required=True,
        **tls,
    )
    controller.start()
    server = start_server(
        base / "data",
        KILDE_SMTP_HOST="127.0.0.1",
        KILDE_SMTP_PORT=str(port),
        KILDE_SMTP_TLS=mode,
        KILDE_SMTP_USER=USER,
        KILDE_SMTP_PASSWORD=PASSWORD,
        KILDE_MAIL_FROM="hello@fjordfell.example",
        SSL_CERT_FILE=str(ca_file),
    )
    yield server, inbox, mode
    server.stop()
    controller.stop()


def test_confirmation_mail_goes_over_tls_with_the_configured_login(
    secure_mail: tuple[Server, SecureInbox, str],
) -> None:
    server, inbox, mode = secure_mail
    address = f"tls.{mode}@example.com"
    client = httpx.Client(base_url=server.url)
    answer = client.post(
        "/f/newsletter",
        data={
            "csrf": csrf_of(client.get("/f/newsletter").text),
            "email": address,
            "consent.marketing_email": "yes",
        },
    )
    assert answer.status_code == 200
    inbox.wait(1)
    assert len(inbox.messages) == 1, server.log_text()[-2000:]
    mail, over_tls, login = inbox.messages[0]
    assert (over_tls, login) == (True, USER)
    assert mail["To"] == address
    assert mail["From"] == "hello@fjordfell.example"
    assert PASSWORD not in server.log_text()

    text = next(
        part.get_payload(decode=True).decode()
        for part in mail.walk()
        if part.get_content_type() == "text/plain"
    )
    link = re.search(r"http://\S+/f/newsletter/confirm\?t=(\S+)", text)
    assert link, text
    person = identify_with(server, "email", address)
    assert ledger(server, person["anonymous_id"]) == []
    confirmed = client.post("/f/newsletter/confirm", data={"t": link.group(1)})
    assert confirmed.status_code == 200
    assert ledger(server, person["anonymous_id"]) == [
        ("marketing_email", "granted", "double-opt-in:form:newsletter")
    ]


def test_an_untrusted_certificate_sends_nothing_and_breaks_nothing(
    secure_mail: tuple[Server, SecureInbox, str], tmp_path: Path
) -> None:
    """Without the company's CA, Kilde refuses the server's certificate: no mail, no consent."""
    server, inbox, mode = secure_mail
    smtp = {k: v for k, v in server.env.items() if k.startswith(("KILDE_SMTP", "KILDE_MAIL"))}
    untrusting = start_server(tmp_path / "data", **smtp)
    try:
        before = len(inbox.messages)
        client = httpx.Client(base_url=untrusting.url)
        address = f"untrusted.{mode}@example.com"
        answer = client.post(
            "/f/newsletter",
            data={
                "csrf": csrf_of(client.get("/f/newsletter").text),
                "email": address,
                "consent.marketing_email": "yes",
            },
        )
        assert answer.status_code == 200
        # The person is told the truth: no mail went out, so nothing is subscribed yet.
        assert "could not send the confirmation mail" in answer.text
        person = identify_with(untrusting, "email", address)
        assert len(inbox.messages) == before  # the mail is sent (or not) before the answer
        assert ledger(untrusting, person["anonymous_id"]) == []
        log = untrusting.log_text()
        assert "confirmation mail for form newsletter failed" in log
        assert address not in log
    finally:
        untrusting.stop()
