"""Masking of the agent token and secret-looking values in every line the agent writes or sends."""

from __future__ import annotations

import re

MASK = "***"

# key=value / key: value / "key": "value" where the key ENDS with a secret word (ACCESS_TOKEN,
# db_password, AWS_SECRET_ACCESS_KEY, x-token), not where it merely contains one (token_acc=0.9)
_KEYED = (
    r"(?P<key>(?:passw(?:or)?d|pwd|secret|token|api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key|credentials?)"
    r"""["']?\s*[:=]\s*["']?)(?P<kval>[^\s"'&,;}]+)"""
)
_BEARER = r"(?P<bearer>\b(?:bearer|basic)\s+)(?P<bval>[A-Za-z0-9._~+/=-]{8,})"
_AWS_ID = r"(?P<aws>\b(?:AKIA|ASIA)[0-9A-Z]{16}\b)"
_URL_PW = r"(?P<url>[a-z][a-z0-9+.-]*://[^/\s:@]+:)(?P<uval>[^/\s@]+)(?=@)"

_SECRETS = re.compile("|".join((_KEYED, _BEARER, _AWS_ID, _URL_PW)), re.IGNORECASE)
# Pre-filter, on lower-cased text: cheap substring tests first, then the precise hint (a
# secret word needs a separator right after it: "tokenizer" or "token_acc=" are no hint).
_WORDS = ("passw", "pwd", "secret", "token", "key", "credential", "bearer", "basic", "akia", "asia", "://")
# (\\? : the batch test runs on JSON text, where a quote in a message is escaped)
_HINT = re.compile(
    r"""(?:passw(?:or)?d|pwd|secret|token|key|credentials?)\\?["']?\s*[:=]|bearer\s|basic\s|akia|asia|://"""
)


# fields with a fixed vocabulary, never a secret
_SAFE_KEYS = frozenset({"level", "stream", "event_type"})


def _hinted(text: str) -> bool:
    low = text.lower()
    return any(w in low for w in _WORDS) and _HINT.search(low) is not None


def _replace(m: re.Match) -> str:
    if m.group("kval") is not None:
        return m.group("key") + MASK
    if m.group("bval") is not None:
        return m.group("bearer") + MASK
    if m.group("uval") is not None:
        return m.group("url") + MASK
    return MASK


class Masker:
    """Masks the given literal secrets (the agent token) and secret-looking values."""

    def __init__(self, *literals: str):
        self.literals = tuple(s for s in literals if s and len(s) >= 6)

    def __call__(self, text: str) -> str:
        for lit in self.literals:
            if lit in text:
                text = text.replace(lit, MASK)
        if _hinted(text):
            text = _SECRETS.sub(_replace, text)
        return text

    def needed(self, text: str) -> bool:
        """Could `text` hold anything to mask? (one scan; most log text cannot)"""
        return any(lit in text for lit in self.literals) or _hinted(text)

    def line(self, line: dict) -> dict:
        """Mask every string field of a log line dict (in place) and return it."""
        for k, v in line.items():
            if type(v) is str and k not in _SAFE_KEYS:
                line[k] = self(v)
        return line

    def lines(self, lines: list[dict]) -> list[dict]:
        """Mask a batch of log line dicts in place and return it."""
        for line in lines:
            self.line(line)
        return lines
