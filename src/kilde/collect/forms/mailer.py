"""Sending mail through the company's SMTP server (double opt-in confirmations).

Settings come from the environment so secrets stay out of the plan:
KILDE_SMTP_HOST, KILDE_SMTP_PORT (25), KILDE_SMTP_TLS (none, starttls or ssl),
KILDE_SMTP_USER, KILDE_SMTP_PASSWORD, KILDE_MAIL_FROM.
"""

from __future__ import annotations

import os
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage

from kilde.errors import ConfigError


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int = 25
    tls: str = "none"
    user: str | None = None
    password: str | None = None
    sender: str = "no-reply@localhost"

    @classmethod
    def from_env(cls) -> SmtpSettings | None:
        env = os.environ
        host = env.get("KILDE_SMTP_HOST")
        if not host:
            return None
        tls = env.get("KILDE_SMTP_TLS", "none").lower()
        if tls not in ("none", "starttls", "ssl"):
            raise ConfigError(
                "KILDE_SMTP_TLS must be none, starttls or ssl", fix="set it to one of those"
            )
        return cls(
            host=host,
            port=int(env.get("KILDE_SMTP_PORT", "465" if tls == "ssl" else "25")),
            tls=tls,
            user=env.get("KILDE_SMTP_USER") or None,
            password=env.get("KILDE_SMTP_PASSWORD") or None,
            sender=env.get("KILDE_MAIL_FROM", "no-reply@localhost"),
        )


def send_mail(settings: SmtpSettings, to: str, subject: str, text: str, html: str) -> None:
    message = EmailMessage()
    message["From"] = settings.sender
    message["To"] = to
    message["Subject"] = subject
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if settings.tls == "ssl":
        smtp = smtplib.SMTP_SSL(settings.host, settings.port, context=context, timeout=20)
    else:
        smtp = smtplib.SMTP(settings.host, settings.port, timeout=20)
    with smtp:
        if settings.tls == "starttls":
            smtp.starttls(context=context)
        if settings.user and settings.password:
            smtp.login(settings.user, settings.password)
        smtp.send_message(message)
