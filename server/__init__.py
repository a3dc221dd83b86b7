"""Reference task server for sly-agent: protocol v1 (agent and user API), blob store, console."""
