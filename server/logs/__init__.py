"""Task logs: bounded ingest by seq, pages, and the live feed to followers."""
