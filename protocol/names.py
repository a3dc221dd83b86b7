"""What no name on the wire may hold: control characters (C0, DEL, C1).

In a name they would rewrite a reader's terminal (the CLI's listings) or split a log line. The
server refuses them in every name and path (server/http/fields.py), the agent skips result files
named with them (workers/safefs.py), and the CLI shows them as escapes (client/term.py).
"""

from __future__ import annotations

import re

CONTROL_CODEPOINTS = (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0))
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
