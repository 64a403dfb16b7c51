"""Rewriting an HTML mail per recipient: tracked links, an unsubscribe link and an open pixel.

The template is parsed once with the standard library's `html.parser`, which only *locates* the
tags to change; everything else is copied byte for byte, so the fragile HTML of mail templates
(Outlook conditional comments, odd whitespace, entities) survives. Links inside Outlook
conditional comments (`<!--[if mso]> <v:roundrect href=...> <![endif]-->`) are rewritten too.

What happens to an `href`:

- `http(s)://...` absolute links become click links (`/e/c/<token>`), one link id per distinct
  URL (and `data-kilde-link` label, so two buttons to the same page can be told apart);
- `kilde:unsubscribe`, or any link with the attribute `data-kilde-unsubscribe`, becomes the
  recipient's unsubscribe link (`/e/u/<token>`);
- links with `data-kilde-notrack`, `mailto:`, `tel:`, `#anchors` stay as they are;
- relative links, links with merge tags (`{{...}}`, `*|...|*`, `%%...%%`) and over-long links are
  left untracked with a warning.

The open pixel goes just before the last `</body>` (or at the end of a fragment).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urlsplit

LINK_TAGS = ("a", "area", "v:roundrect", "v:rect", "v:oval", "v:shape")
UNSUBSCRIBE_HREF = "kilde:unsubscribe"
MAX_URL_LENGTH = 2048
_MERGE_TAG = re.compile(r"\{\{|\}\}|\*\||\|\*|%%|\[\[|<%")
PIXEL_TAG = (
    '<img src="{src}" width="1" height="1" alt="" border="0" '
    'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0" />'
)


@dataclass(frozen=True)
class Link:
    """A distinct tracked link of the template; its position in `Template.links` is its id."""

    url: str
    label: str | None


@dataclass(frozen=True)
class _Slot:
    """A tag to rebuild per recipient: `before` + the new href + `after`."""

    start: int
    end: int
    before: str
    after: str
    link: int | None  # index into Template.links; None for the unsubscribe link


@dataclass
class Template:
    source: str
    links: list[Link] = field(default_factory=list)
    slots: list[_Slot] = field(default_factory=list)
    static: list[tuple[int, int, str]] = field(default_factory=list)  # tags rebuilt once
    pixel_at: int = 0
    has_unsubscribe: bool = False
    warnings: list[str] = field(default_factory=list)

    def render(
        self,
        link_url: Callable[[int], str],
        unsubscribe_url: str,
        pixel_url: str,
    ) -> str:
        """The mail for one recipient, given their URLs."""
        edits: list[tuple[int, int, str]] = list(self.static)
        for slot in self.slots:
            url = unsubscribe_url if slot.link is None else link_url(slot.link)
            edits.append((slot.start, slot.end, slot.before + html.escape(url) + slot.after))
        edits.append((self.pixel_at, self.pixel_at, PIXEL_TAG.format(src=html.escape(pixel_url))))
        edits.sort(key=lambda e: (e[0], e[1]))
        out: list[str] = []
        at = 0
        for start, end, text in edits:
            out.append(self.source[at:start])
            out.append(text)
            at = end
        out.append(self.source[at:])
        return "".join(out)


def _build_tag(tag: str, attrs: list[tuple[str, str | None]], closed: bool) -> tuple[str, str]:
    """The tag's text split around the href value (the second part is empty without href)."""
    before = [f"<{tag}"]
    after: list[str] = []
    target = before
    for name, value in attrs:
        if name == "href":
            before.append(' href="')
            target = after
            after.append('"')
            continue
        target.append(f" {name}" if value is None else f' {name}="{html.escape(value)}"')
    (after if target is after else before).append(" />" if closed else ">")
    return "".join(before), "".join(after)


class _Scanner(HTMLParser):
    """Finds link tags, conditional comments and the closing body tag, by character offset."""

    def __init__(self, text: str, base: int) -> None:
        super().__init__(convert_charrefs=True)
        self.text = text
        self.base = base
        self._line_starts = [0]
        for index, char in enumerate(text):
            if char == "\n":
                self._line_starts.append(index + 1)
        self.tags: list[tuple[int, int, str, list[tuple[str, str | None]], bool]] = []
        self.comments: list[tuple[int, str]] = []
        self.body_end: int | None = None

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def _tag(self, tag: str, attrs: list[tuple[str, str | None]], closed: bool) -> None:
        if tag in LINK_TAGS or any(name.startswith("data-kilde-") for name, _ in attrs):
            raw = self.get_starttag_text() or ""
            start = self._offset()
            self.tags.append((self.base + start, self.base + start + len(raw), tag, attrs, closed))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, attrs, False)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, attrs, True)

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            self.body_end = self.base + self._offset()

    def handle_comment(self, data: str) -> None:
        if data.lstrip().lower().startswith("[if"):
            self.comments.append((self.base + self._offset() + 4, data))


def _scan(text: str, base: int) -> _Scanner:
    scanner = _Scanner(text, base)
    scanner.feed(text)
    scanner.close()
    return scanner


def _classify(href: str) -> tuple[str, str | None]:
    """('track'|'keep'|'unsubscribe', warning)."""
    if href.lower() == UNSUBSCRIBE_HREF:
        return "unsubscribe", None
    if not href or href.startswith("#"):
        return "keep", None
    if _MERGE_TAG.search(href):
        return "keep", "a link with a merge tag was left untracked (merge before rendering)"
    try:
        parts = urlsplit(href)
    except ValueError:
        return "keep", "a link that is not a valid URL was left untracked"
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.netloc:
            return "keep", "a link without a host was left untracked"
        if len(href) > MAX_URL_LENGTH:
            return "keep", f"a link longer than {MAX_URL_LENGTH} characters was left untracked"
        return "track", None
    if scheme:
        return "keep", None  # mailto:, tel:, sms: and the like
    return "keep", "a relative link was left untracked; mail clients need absolute URLs"


def parse_template(source: str, *, own_prefix: str | None = None) -> Template:
    """Analyse a mail template once; `Template.render` then makes each recipient's copy.

    `own_prefix` is Kilde's public tracking prefix: links already pointing there are kept.
    """
    template = Template(source)
    warnings: list[str] = []
    ids: dict[tuple[str, str | None], int] = {}
    pending = [(source, 0)]
    body_end: int | None = None
    first = True
    while pending:
        text, base = pending.pop(0)
        try:
            scanner = _scan(text, base)
        except Exception:  # html.parser is lenient; a failure inside a comment is not fatal
            warnings.append("a conditional comment could not be parsed; its links are untracked")
            continue
        if first:
            body_end = scanner.body_end
            first = False
        for start, data in scanner.comments:
            opener = data.find("]>")
            if opener != -1:
                pending.append((data[opener + 2 :], start + opener + 2))
        for start, end, tag, attrs, closed in scanner.tags:
            names = {name for name, _ in attrs}
            href = next((v for n, v in attrs if n == "href"), None)
            label = next((v for n, v in attrs if n == "data-kilde-link"), None)
            kept = [(n, v) for n, v in attrs if not n.startswith("data-kilde-")]
            if href is None:
                kind, warning = "keep", None
            elif "data-kilde-unsubscribe" in names:
                kind, warning = "unsubscribe", None
            elif "data-kilde-notrack" in names:
                kind, warning = "keep", None
            else:
                href = href.strip()
                kind, warning = _classify(href)
                if kind == "track" and own_prefix and href.startswith(own_prefix):
                    kind = "keep"
            if warning:
                warnings.append(warning)
            before, after = _build_tag(tag, kept, closed)
            if kind == "keep":
                if len(kept) != len(attrs):  # only the data-kilde-* attributes go
                    value = "" if href is None else html.escape(href)
                    text_now = before + value + after if href is not None else before
                    template.static.append((start, end, text_now))
                continue
            if kind == "unsubscribe":
                template.has_unsubscribe = True
                template.slots.append(_Slot(start, end, before, after, None))
                continue
            assert href is not None
            key = (href, label or None)
            if key not in ids:
                ids[key] = len(template.links)
                template.links.append(Link(href, label or None))
            template.slots.append(_Slot(start, end, before, after, ids[key]))
    template.pixel_at = body_end if body_end is not None else len(source)
    template.slots.sort(key=lambda s: s.start)
    # Keep each warning once, in the order first seen.
    template.warnings = list(dict.fromkeys(warnings))
    return template
