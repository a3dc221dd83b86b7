"""Node telemetry: the latest sample and the bounded history."""
