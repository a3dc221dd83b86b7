"""Text from the server made safe to print on a terminal.

A task's log, a node's name and an error's detail come from nodes and task containers, which are
not trusted. Printed raw, their control characters would drive the reader's terminal: clear the
screen, set its title, write the clipboard (OSC 52), move the cursor to overwrite earlier lines,
or reorder text with bidirectional overrides. `safe` shows each of them as a visible escape
(`\\x1b`, `\\u202e`) instead, so the text reads as what was sent and does nothing else.
"""

from __future__ import annotations

from protocol.names import CONTROL_CODEPOINTS

_BIDI = [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_UNSAFE = {c: f"\\x{c:02x}" for c in CONTROL_CODEPOINTS if c != 0x09}
_UNSAFE.update({c: f"\\u{c:04x}" for c in _BIDI})


def safe(text) -> str:
    """`text` (any value, None as "") with every terminal control character shown as an escape;
    tabs are kept."""
    return "" if text is None else str(text).translate(_UNSAFE)
