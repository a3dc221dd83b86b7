"""Nodes: registering and editing them, their contact batches, connect and the long-poll."""
