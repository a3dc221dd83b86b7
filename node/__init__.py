"""Node-level helpers that the agent (supervisor and its process roles) and the workers (task-type
handlers) both use: settings, the storage layout, masking, the agent API client and the durable
task log. Imports only `protocol` and third-party libraries, never `agent`, `workers`, `server`
or `client`, so that the dependencies point one way: agent -> workers -> node -> protocol.
"""

__version__ = "0.1.0"
