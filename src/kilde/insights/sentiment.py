"""Sentiment of free text (support tickets, chats, call notes) as a score and a label.

The analyser sits behind the small `Analyzer` protocol, so a better model can replace VADER
without touching the importers: `load_analyzer("package.module:factory")` calls the factory and
uses what it returns. VADER (a lexicon and rule based model, English) is the default because it
needs no model download and scores a ticket in about 0.1 ms.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol, runtime_checkable

from kilde.errors import KildeError

Label = Literal["positive", "neutral", "negative"]

# VADER's authors' thresholds on the compound score.
POSITIVE_FROM = 0.05
NEGATIVE_TO = -0.05


@dataclass(frozen=True)
class Sentiment:
    score: float  # -1 (most negative) .. 1 (most positive)
    label: Label


@runtime_checkable
class Analyzer(Protocol):
    """Anything that turns a text into a Sentiment."""

    name: str

    def analyze(self, text: str) -> Sentiment: ...


def label_for(score: float) -> Label:
    if score >= POSITIVE_FROM:
        return "positive"
    if score <= NEGATIVE_TO:
        return "negative"
    return "neutral"


class VaderAnalyzer:
    """VADER (Hutto and Gilbert, 2014) through the `vaderSentiment` package."""

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._vader = SentimentIntensityAnalyzer()

    def analyze(self, text: str) -> Sentiment:
        score = round(float(self._vader.polarity_scores(text)["compound"]), 4)
        return Sentiment(score, label_for(score))


@lru_cache(maxsize=8)
def load_analyzer(spec: str | None = None) -> Analyzer:
    """`None` or "vader" for VADER; "package.module:factory" for a model of your own."""
    if spec is None or spec == "vader":
        return VaderAnalyzer()
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise KildeError(
            f"the sentiment analyser {spec!r} is not understood",
            fix='write "vader" or "package.module:factory"',
        )
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        raise KildeError(
            f"the sentiment analyser {spec!r} could not be imported",
            fix="install the package that provides it, or use the default (vader)",
        ) from None
    analyzer = factory()
    if not isinstance(analyzer, Analyzer):
        raise KildeError(
            f"{spec!r} did not return an analyser",
            fix="the factory must return an object with `name` and `analyze(text) -> Sentiment`",
        )
    return analyzer
