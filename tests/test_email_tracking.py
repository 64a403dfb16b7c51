"""Email tracking on the real server: rendered campaigns, open pixels, clicks, unsubscribes.

A campaign is rendered through the admin API (and the CLI), then its pixel and links are hit
with a real HTTP client, as a person's mail client, as privacy proxies and as an attacker would.
"""

from __future__ import annotations

import csv
import html.parser
import string
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from kilde.collect.email_campaigns import CLICK, OPEN, UNSUBSCRIBE
from kilde.signing import TokenSigner, url_digest
from tests.conftest import Server, start_server

CHROME_ON_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
APPLE_MAIL_ON_IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)
APPLE_MPP = "Mozilla/5.0"
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
NORWAY_IP = "81.167.0.1"  # a Norwegian address (Telenor), for the country lookup

TEMPLATE = """<!doctype html>
<html><head><title>Spring</title></head>
<body style="margin:0">
  <p>Hei! Our spring sale starts now &amp; ends Sunday.</p>
  <a href="https://fjordfell.example/sale?utm_source=mail&amp;utm_campaign=spring"
     data-kilde-link="hero">See the sale</a>
  <a href="https://fjordfell.example/jackets">Jackets</a>
  <a href="https://fjordfell.example/sale?utm_source=mail&amp;utm_campaign=spring">Again</a>
  <a href="mailto:help@fjordfell.example">Write to us</a>
  <a href="#top">Top</a>
  <!--[if mso]>
  <v:roundrect href="https://fjordfell.example/jackets" style="height:40px">Jackets</v:roundrect>
  <![endif]-->
  <p><a href="kilde:unsubscribe">Unsubscribe</a></p>
</body></html>
"""


class Urls(html.parser.HTMLParser):
    """Every href and src of a rendered mail, comments included."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "href" and value:
                self.hrefs.append(value)
            if name == "src" and value:
                self.srcs.append(value)

    def handle_comment(self, data: str) -> None:
        if data.lstrip().startswith("[if"):
            inner = urls_of(data[data.index("]>") + 2 :])
            self.hrefs += inner.hrefs
            self.srcs += inner.srcs


def urls_of(mail: str) -> Urls:
    parser = Urls()
    parser.feed(mail)
    return parser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Behind a proxy the client address comes from X-Forwarded-For: lets a test pick a country.
    running = start_server(tmp_path_factory.mktemp("email") / "data", KILDE_TRUST_PROXY="1")
    yield running
    running.stop()


def render(server: Server, campaign: str, recipients: list[dict[str, str]], **extra: Any) -> Any:
    response = httpx.post(
        f"{server.url}/api/email/campaigns/{campaign}/render",
        json={"html": TEMPLATE, "recipients": recipients, **extra},
        headers=server.admin,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


def events_of(server: Server, **filters: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{server.url}/api/events", params={"limit": 1000, **filters}, headers=server.admin
    )
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def dead_letters(server: Server) -> list[dict[str, Any]]:
    listed = httpx.get(
        f"{server.url}/api/bad-events",
        params={"source": "email", "limit": 1000},
        headers=server.admin,
    ).json()["dead_letters"]
    return [
        httpx.get(f"{server.url}/api/bad-events/{row['id']}", headers=server.admin).json()
        for row in listed
    ]


def report(server: Server, campaign: str) -> dict[str, Any]:
    response = httpx.get(
        f"{server.url}/api/email/campaigns/{campaign}/report", headers=server.admin
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def signer_of(server: Server) -> TokenSigner:
    return TokenSigner.for_data_dir(server.data_dir)


def campaign_id() -> str:
    return f"spring-{uuid.uuid4().hex[:8]}"


def pixel_of(mail: str) -> str:
    return next(src for src in urls_of(mail).srcs if "/e/o/" in src)


def clicks_of(mail: str) -> list[str]:
    return [href for href in urls_of(mail).hrefs if "/e/c/" in href]


def unsubscribe_of(mail: str) -> str:
    return next(href for href in urls_of(mail).hrefs if "/e/u/" in href)


def assert_gif(response: httpx.Response) -> None:
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/gif"
    assert response.content.startswith(b"GIF89a") and len(response.content) == 43
    assert "no-store" in response.headers["cache-control"]
    assert "no-cache" in response.headers["cache-control"]


# -- rendering ----------------------------------------------------------------------------------


def test_render_rewrites_every_link_per_recipient_and_adds_a_pixel(server: Server) -> None:
    campaign = campaign_id()
    result = render(
        server,
        campaign,
        [{"user_id": "render-user-1"}, {"email": "Kari.Nordmann@example.org"}],
        base_url=server.url,
    )
    assert result["purpose"] == "marketing_email"
    assert [(link["link_id"], link["url"], link["label"]) for link in result["links"]] == [
        (0, "https://fjordfell.example/sale?utm_source=mail&utm_campaign=spring", "hero"),
        (1, "https://fjordfell.example/jackets", None),
        (2, "https://fjordfell.example/sale?utm_source=mail&utm_campaign=spring", None),
    ]
    first, second = (mail["html"] for mail in result["mails"])
    for mail in (first, second):
        urls = urls_of(mail)
        # Every web link (the Outlook-only button inside the conditional comment too) is
        # tracked; mailto, anchors stay; the unsubscribe placeholder became a real link.
        assert len(clicks_of(mail)) == 4
        assert not [h for h in urls.hrefs if h.startswith("https://fjordfell.example")]
        assert "mailto:help@fjordfell.example" in urls.hrefs and "#top" in urls.hrefs
        assert unsubscribe_of(mail).startswith(f"{server.url}/e/u/")
        assert "kilde:unsubscribe" not in mail and "data-kilde" not in mail
        assert pixel_of(mail).startswith(f"{server.url}/e/o/")
        assert mail.index(pixel_of(mail)) < mail.index("</body>")
        # The rest of the mail is left as it was, entities included.
        assert "Our spring sale starts now &amp; ends Sunday." in mail
        # Nothing personal in any URL.
        for url in urls.hrefs + urls.srcs:
            assert "render-user-1" not in url
            assert "kari" not in url.lower() and "example.org" not in url
    assert set(clicks_of(first)).isdisjoint(clicks_of(second))
    assert result["mails"][0]["recipient"] != result["mails"][1]["recipient"]
    assert result["mails"][0]["list_unsubscribe"] == f"<{unsubscribe_of(first)}>"
    assert result["mails"][0]["list_unsubscribe_post"] == "List-Unsubscribe=One-Click"


def test_render_refuses_bad_requests_with_a_fix(server: Server) -> None:
    url = f"{server.url}/api/email/campaigns"
    bad_id = httpx.post(
        f"{url}/no spaces here/render",
        json={"html": TEMPLATE, "recipients": [{"user_id": "u"}]},
        headers=server.admin,
    )
    assert bad_id.status_code == 400 and bad_id.json()["error"] == "invalid_campaign"
    nobody = httpx.post(
        f"{url}/{campaign_id()}/render",
        json={"html": TEMPLATE, "recipients": [{"user_id": ""}]},
        headers=server.admin,
    )
    assert nobody.status_code == 400 and nobody.json()["error"] == "invalid_recipient"
    purpose = httpx.post(
        f"{url}/{campaign_id()}/render",
        json={"html": TEMPLATE, "recipients": [{"user_id": "u"}], "purpose": "nonsense"},
        headers=server.admin,
    )
    assert purpose.status_code == 400 and "marketing_email" in purpose.json()["fix"]
    anonymous = httpx.post(
        f"{url}/{campaign_id()}/render", json={"html": TEMPLATE, "recipients": [{"user_id": "u"}]}
    )
    assert anonymous.status_code == 401
    unknown = httpx.get(f"{url}/never-rendered/report", headers=server.admin)
    assert unknown.status_code == 404 and unknown.json()["success"] is False


# -- the open pixel -----------------------------------------------------------------------------


def test_open_pixel_records_human_and_machine_opens_apart(server: Server) -> None:
    campaign = campaign_id()
    user = f"open-{uuid.uuid4().hex[:8]}"
    mail = render(server, campaign, [{"user_id": user}], base_url=server.url)["mails"][0]["html"]
    pixel = pixel_of(mail)

    human = httpx.get(
        pixel, headers={"User-Agent": APPLE_MAIL_ON_IPHONE, "X-Forwarded-For": NORWAY_IP}
    )
    assert_gif(human)
    for agent in (APPLE_MPP, GMAIL_PROXY, YAHOO_PROXY, GOOGLEBOT):
        assert_gif(httpx.get(pixel, headers={"User-Agent": agent}))
    # A request from Apple's own network with a full Apple Mail user agent: the privacy proxy.
    assert_gif(
        httpx.get(
            pixel, headers={"User-Agent": APPLE_MAIL_ON_IPHONE, "X-Forwarded-For": "17.58.1.2"}
        )
    )

    opens = sorted(
        events_of(server, event="Email Opened", user_id=user), key=lambda e: e["timestamp"]
    )
    assert len(opens) == 6
    assert all(e["source"] == "email" and e["type"] == "track" for e in opens)
    first = opens[0]
    assert first["properties"]["machine_open"] is False
    assert first["properties"]["campaign_id"] == campaign
    assert first["device"] == "mobile" and first["os"] == "iOS"
    assert first["country"] == "NO"
    assert first["ip"] == "81.167.0.0"  # the plan truncates addresses
    rules = [(e["properties"]["machine_open"], e["properties"].get("machine_rule")) for e in opens]
    assert rules[1:] == [
        (True, "apple_mpp"),
        (True, "gmail_proxy"),
        (True, "yahoo_proxy"),
        (True, "bot"),
        (True, "apple_mpp"),
    ]

    counted = report(server, campaign)["opens"]
    assert (counted["human"], counted["unique_human"]) == (1, 1)
    assert (counted["machine"], counted["unique_machine"]) == (5, 1)
    assert counted["machine_by_rule"] == {
        "apple_mpp": 2,
        "gmail_proxy": 1,
        "yahoo_proxy": 1,
        "bot": 1,
    }


def test_the_pixel_answers_a_gif_whatever_is_wrong(server: Server) -> None:
    campaign = campaign_id()
    mail = render(server, campaign, [{"user_id": "pixel-bad-input"}], base_url=server.url)
    pixel = pixel_of(mail["mails"][0]["html"])
    token = pixel.rsplit("/", 1)[1].removesuffix(".gif")
    tampered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    signer = signer_of(server)
    later = datetime.now(UTC) + timedelta(days=1)
    stranger = signer.sign(OPEN, {"c": "no-such-campaign", "r": "abc"}, expires_at=later)
    secret = "kari.nordmann@example.org"
    cases = {
        "tampered_token": f"{server.url}/e/o/{tampered}.gif",
        "malformed_token": f"{server.url}/e/o/not-a-token",
        "unknown_campaign": f"{server.url}/e/o/{stranger}.gif",
        "oversized_request": f"{pixel}?junk={secret}&pad={'x' * 3000}",
        "oversized_token": f"{server.url}/e/o/{'a' * 3000}.b",
    }
    before = {letter["id"] for letter in dead_letters(server)}
    for url in cases.values():
        assert_gif(httpx.get(url, headers={"User-Agent": CHROME_ON_WINDOWS}))
    assert report(server, campaign)["opens"]["human"] == 0
    new = [letter for letter in dead_letters(server) if letter["id"] not in before]
    assert sorted(letter["envelope"]["code"] for letter in new) == sorted(cases)
    for letter in new:
        assert letter["channel"] == "email" and letter["reason"]
        assert secret not in letter["payload"] and "junk" not in letter["payload"]
    assert secret not in server.log_text()


# -- clicks -------------------------------------------------------------------------------------


def test_click_redirects_to_the_signed_url_and_records_it(server: Server) -> None:
    campaign = campaign_id()
    user = f"click-{uuid.uuid4().hex[:8]}"
    mail = render(server, campaign, [{"user_id": user}], base_url=server.url)["mails"][0]["html"]
    hero, jackets = clicks_of(mail)[:2]

    response = httpx.get(hero, headers={"User-Agent": CHROME_ON_WINDOWS})
    assert response.status_code == 302
    assert (
        response.headers["location"]
        == "https://fjordfell.example/sale?utm_source=mail&utm_campaign=spring"
    )
    assert "no-store" in response.headers["cache-control"]
    assert response.headers["referrer-policy"] == "no-referrer"
    assert httpx.get(jackets, headers={"User-Agent": CHROME_ON_WINDOWS}).headers["location"] == (
        "https://fjordfell.example/jackets"
    )
    # A security gateway following the link first: still redirected, counted as a machine.
    scanned = httpx.head(jackets, headers={"User-Agent": "Mimecast URL scanner"})
    assert scanned.status_code == 302
    # A crawler too: to the signed target only, counted as a machine.
    crawled = httpx.get(jackets, headers={"User-Agent": GOOGLEBOT})
    assert crawled.headers["location"] == "https://fjordfell.example/jackets"

    clicked = events_of(server, event="Email Link Clicked", user_id=user)
    by_url = sorted((e["properties"]["link_id"], e["properties"]["machine_click"]) for e in clicked)
    assert by_url == [(0, False), (1, False), (1, True), (1, True)]
    hero_event = next(e for e in clicked if e["properties"]["link_id"] == 0)
    assert hero_event["properties"]["label"] == "hero"
    assert hero_event["properties"]["url"].startswith("https://fjordfell.example/sale")
    assert hero_event["device"] == "desktop"

    counted = report(server, campaign)
    assert counted["clicks"]["human"] == 2 and counted["clicks"]["unique_human"] == 1
    assert counted["clicks"]["machine"] == 2
    per_link = {link["link_id"]: link for link in counted["links"]}
    assert per_link[0]["human_clicks"] == 1 and per_link[1]["machine_clicks"] == 2


def test_tampered_expired_and_foreign_click_tokens_get_400_and_no_redirect(
    server: Server,
) -> None:
    campaign = campaign_id()
    mail = render(server, campaign, [{"user_id": "click-bad"}], base_url=server.url)
    link = clicks_of(mail["mails"][0]["html"])[0]
    token = link.rsplit("/", 1)[1]
    payload, signature = token.split(".")
    signer = signer_of(server)
    recipient = mail["mails"][0]["recipient"]
    sale = "https://fjordfell.example/sale?utm_source=mail&utm_campaign=spring"
    past = datetime.now(UTC) - timedelta(seconds=5)
    later = datetime.now(UTC) + timedelta(days=1)
    ids = {"c": campaign, "r": recipient}
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    middle = len(signature) // 2
    flipped = signature[:middle] + ("A" if signature[middle] != "A" else "B")
    flipped += signature[middle + 1 :]
    # the last character's spare bits: another spelling of the very same signature bytes
    respelled = signature[:-1] + alphabet[alphabet.index(signature[-1]) ^ 1]
    cases = {
        # someone edits the token to point elsewhere: the signature no longer matches
        "tampered_token": f"{server.url}/e/c/{payload}.{flipped}",
        "tampered_token  ": f"{server.url}/e/c/{payload}.{respelled}",
        # a real token from an old mail
        "expired_token": f"{server.url}/e/c/"
        + signer.sign(CLICK, {**ids, "l": 0, "h": url_digest(sale)}, expires_at=past),
        # an open-pixel token is worthless as a click token
        "tampered_token ": f"{server.url}/e/c/" + signer.sign(OPEN, ids, expires_at=later),
        # a signed link id whose URL digest is not the stored link's: no redirect to it
        "unknown_link": f"{server.url}/e/c/"
        + signer.sign(
            CLICK, {**ids, "l": 0, "h": url_digest("https://evil.example/")}, expires_at=later
        ),
        "unknown_campaign": f"{server.url}/e/c/"
        + signer.sign(
            CLICK, {"c": "nope", "r": recipient, "l": 0, "h": url_digest(sale)}, expires_at=later
        ),
        "malformed_token": f"{server.url}/e/c/https%3A%2F%2Fevil.example",
        "oversized_request": f"{link}?next=https://evil.example/&pad={'y' * 3000}",
    }
    before = {letter["id"] for letter in dead_letters(server)}
    for name, url in cases.items():
        response = httpx.get(url, headers={"User-Agent": CHROME_ON_WINDOWS})
        assert response.status_code == 400, name
        assert "location" not in response.headers, name
        assert response.headers["content-type"].startswith("text/html")
        assert "not valid" in response.text or "expired" in response.text
        assert "evil.example" not in response.text
    assert "expired" in httpx.get(cases["expired_token"]).text
    # The genuine link still works, to its own target only, whatever is appended.
    genuine = httpx.get(
        f"{link}?next=https://evil.example/", headers={"User-Agent": CHROME_ON_WINDOWS}
    )
    assert genuine.status_code == 302 and genuine.headers["location"] == sale
    new = [letter for letter in dead_letters(server) if letter["id"] not in before]
    codes = sorted(letter["envelope"]["code"] for letter in new)
    # every bad click plus the plain GET of the expired link above
    assert codes == sorted([name.strip() for name in cases] + ["expired_token"])
    assert report(server, campaign)["clicks"]["human"] == 1


# -- unsubscribe --------------------------------------------------------------------------------


def test_unsubscribe_link_and_one_click_record_an_opt_out(server: Server) -> None:
    campaign = campaign_id()
    people = [{"user_id": f"unsub-{uuid.uuid4().hex[:8]}"}, {"email": "ola@example.org"}]
    mails = render(server, campaign, people, base_url=server.url)["mails"]
    link = unsubscribe_of(mails[0]["html"])

    # Opening the link shows a confirmation: link scanners follow links, people press buttons.
    page = httpx.get(link)
    assert page.status_code == 200 and "<form" in page.text and 'method="post"' in page.text
    assert events_of(server, event="Unsubscribed", user_id=people[0]["user_id"]) == []

    confirmed = httpx.post(link, data={"confirm": "1"})
    assert confirmed.status_code == 200 and "unsubscribed" in confirmed.text
    # The List-Unsubscribe header of the second mail, as a mail client uses it (RFC 8058).
    header_url = mails[1]["list_unsubscribe"].strip("<>")
    one_click = httpx.post(header_url, data={"List-Unsubscribe": "One-Click"})
    assert one_click.status_code == 200

    first = events_of(server, event="Unsubscribed", user_id=people[0]["user_id"])
    assert [e["properties"]["method"] for e in first] == ["link"]
    assert first[0]["properties"]["purpose"] == "marketing_email"
    anonymous = f"kr-{mails[1]['recipient']}"
    second = events_of(server, event="Unsubscribed", anonymous_id=anonymous)
    assert [e["properties"]["method"] for e in second] == ["one_click"]
    assert report(server, campaign)["unsubscribes"] == 2

    # Both are opt-outs of the marketing purpose in the consent ledger.
    for person in ({"user_id": people[0]["user_id"]}, {"anonymous_id": anonymous}):
        consent = httpx.get(f"{server.url}/api/consent", params=person, headers=server.admin)
        assert consent.status_code == 200, consent.text
        assert consent.json()["current"] == {"marketing_email": "withdrawn"}
        (row,) = consent.json()["records"]
        assert (row["source"], row["channel"]) == ("email", "email")
        assert row["evidence"] == f"email unsubscribe, campaign {campaign}"

    tampered = link[:-2] + ("AA" if not link.endswith("AA") else "BB")
    refused = httpx.post(tampered, data={"List-Unsubscribe": "One-Click"})
    assert refused.status_code == 400 and "location" not in refused.headers


# -- the report and the CLI ---------------------------------------------------------------------


def test_cli_renders_a_campaign_and_reports_it(server: Server, tmp_path: Path) -> None:
    campaign = campaign_id()
    template = tmp_path / "mail.html"
    template.write_text(TEMPLATE)
    recipients = tmp_path / "recipients.csv"
    recipients.write_text("user_id,email\ncli-user-1,cli1@example.org\n,cli2@example.org\n")
    out = tmp_path / "mails"
    result = server.kilde(
        "email",
        "links",
        "--campaign",
        campaign,
        "--recipients",
        str(recipients),
        "--template",
        str(template),
        "--out",
        str(out),
    )
    assert "2 mails" in result.stdout
    with (out / "manifest.csv").open() as handle:
        manifest = list(csv.DictReader(handle))
    assert [row["email"] for row in manifest] == ["cli1@example.org", "cli2@example.org"]
    files = sorted(out.glob("*.html"))
    assert len(files) == 2
    for row in manifest:
        mail = (out / row["file"]).read_text()
        assert "example.org" not in mail and "cli-user-1" not in mail
        assert row["list_unsubscribe"] == f"<{unsubscribe_of(mail)}>"
        assert urlsplit(pixel_of(mail)).netloc == urlsplit(server.url).netloc

    first = (out / manifest[0]["file"]).read_text()
    httpx.get(pixel_of(first), headers={"User-Agent": CHROME_ON_WINDOWS})
    httpx.get(pixel_of(first), headers={"User-Agent": GMAIL_PROXY})
    second = (out / manifest[1]["file"]).read_text()
    httpx.get(pixel_of(second), headers={"User-Agent": APPLE_MPP})
    httpx.get(clicks_of(first)[1], headers={"User-Agent": CHROME_ON_WINDOWS})

    counted = orjson.loads(server.kilde("email", "report", "--campaign", campaign, "--json").stdout)
    assert counted["recipients"] == 2
    assert counted["opens"]["human"] == 1 and counted["opens"]["unique_human"] == 1
    assert counted["opens"]["machine"] == 2 and counted["opens"]["unique_machine"] == 2
    assert counted["clicks"]["human"] == 1 and counted["rates"]["click_rate"] == 0.5
    table = server.kilde("email", "report", "--campaign", campaign).stdout
    assert "human opens" in table and "machine opens" in table

    listed = server.kilde("email", "campaigns", "--json").stdout
    assert campaign in listed
    assert "cli1@example.org" not in server.log_text()
    assert "cli-user-1" not in server.log_text()


def test_cli_explains_bad_recipient_files(server: Server, tmp_path: Path) -> None:
    template = tmp_path / "mail.html"
    template.write_text(TEMPLATE)
    recipients = tmp_path / "people.csv"
    recipients.write_text("name\nKari\n")
    result = server.kilde(
        "email",
        "links",
        "--campaign",
        campaign_id(),
        "--recipients",
        str(recipients),
        "--template",
        str(template),
        check=False,
    )
    assert result.returncode == 1
    assert "no user_id or email column" in result.stderr and "fix:" in result.stderr


def test_secret_key_file_is_private_and_stable(server: Server) -> None:
    key = server.data_dir / "secret.key"
    assert key.exists()
    assert key.stat().st_mode & 0o777 == 0o600
    assert signer_of(server).pseudonym("x", "y") == signer_of(server).pseudonym("x", "y")


def test_unsubscribe_token_cannot_be_forged_from_a_click_token(server: Server) -> None:
    campaign = campaign_id()
    mail = render(server, campaign, [{"user_id": "forge"}], base_url=server.url)
    click = clicks_of(mail["mails"][0]["html"])[0]
    forged = click.replace("/e/c/", "/e/u/")
    response = httpx.post(forged, data={"List-Unsubscribe": "One-Click"})
    assert response.status_code == 400
    later = datetime.now(UTC) + timedelta(days=1)
    signer = signer_of(server)
    real = signer.sign(
        UNSUBSCRIBE, {"c": campaign, "r": mail["mails"][0]["recipient"]}, expires_at=later
    )
    assert httpx.get(f"{server.url}/e/u/{real}").status_code == 200
    assert report(server, campaign)["unsubscribes"] == 0


def test_render_leaves_everything_but_the_links_as_it_was(server: Server) -> None:
    template = (
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN">\n'
        "<HTML><HEAD><STYLE>a{color:#2f6f5e} td>p{margin:0}</STYLE></HEAD>\n"
        "<BODY><TABLE><TR><TD CLASS='x'>Caf&eacute; &#8212; &amp; more &nbsp;</TD></TR></TABLE>\n"
        '<!-- a plain comment with <a href="https://not.tracked.example/">x</a> -->\n'
        '<img src="https://fjordfell.example/logo.png" alt="">\n'
        '<a href="https://fjordfell.example/?a=1&amp;b=2">Shop</a>\n'
        '<a name="anchor-only">no href</a>\n'
        '<a href="https://fjordfell.example/x">X</a>\n'
        "</BODY></HTML>\n"
    )
    response = httpx.post(
        f"{server.url}/api/email/campaigns/{campaign_id()}/render",
        json={"html": template, "recipients": [{"user_id": "verbatim"}], "base_url": server.url},
        headers=server.admin,
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert [link["url"] for link in result["links"]] == [
        "https://fjordfell.example/?a=1&b=2",
        "https://fjordfell.example/x",
    ]
    assert any("unsubscribe" in warning for warning in result["warnings"])
    mail = result["mails"][0]["html"]
    pixel = mail[mail.index('<img src="' + server.url) : mail.index("</BODY>")]
    mail = mail.replace(pixel, "")
    for click in clicks_of(mail):
        mail = mail.replace(click.replace("&", "&amp;"), "TRACKED")
    expected = template.replace("https://fjordfell.example/?a=1&amp;b=2", "TRACKED").replace(
        "https://fjordfell.example/x", "TRACKED"
    )
    assert mail == expected


def test_secret_key_from_the_environment(tmp_path: Path) -> None:
    key = "k" * 48
    running = start_server(tmp_path / "data", KILDE_SECRET_KEY=key)
    try:
        result = render(running, "env-key", [{"user_id": "env"}], base_url=running.url)
        mail = result["mails"][0]["html"]
        token = pixel_of(mail).rsplit("/", 1)[1].removesuffix(".gif")
        assert TokenSigner([key.encode()]).verify(OPEN, token)["c"] == "env-key"
        assert not (running.data_dir / "secret.key").exists()
        link = clicks_of(mail)[0]
    finally:
        running.stop()
    # A key too short to be safe: tracking says so and never redirects; the pixel still answers.
    weak = start_server(tmp_path / "data", KILDE_SECRET_KEY="short")
    try:
        refused = httpx.post(
            f"{weak.url}/api/email/campaigns/env-key/render",
            json={"html": TEMPLATE, "recipients": [{"user_id": "env"}]},
            headers=weak.admin,
        )
        assert refused.status_code == 503 and "KILDE_SECRET_KEY" in refused.json()["message"]
        click = httpx.get(link.replace(urlsplit(link).netloc, urlsplit(weak.url).netloc))
        assert click.status_code == 503 and "location" not in click.headers
        assert_gif(httpx.get(f"{weak.url}/e/o/{token}.gif"))
    finally:
        weak.stop()
