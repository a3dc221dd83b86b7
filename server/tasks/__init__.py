"""Tasks: creating and reading them, state changes, the hand-out and lease reaper, results, retention."""
