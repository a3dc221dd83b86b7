"""The wire contract shared by the agent, the workers, the server and the client.

Standard library only: the agent image ships it, and every side imports it instead of keeping
its own copy of a state name, a task type, a path, a header or a log-line rule.

- `protocol.states`: task states and the allowed edges between them.
- `protocol.tasks`: task types and log streams/levels.
- `protocol.endpoints`: endpoint paths and headers.
- `protocol.logline`: the durable log line (`{"seq": n, ...}`), encode and parse.
- `protocol.errors`: error bodies (`{"error", "detail"}`) and the one `APIError`.
"""

VERSION = "v1"
