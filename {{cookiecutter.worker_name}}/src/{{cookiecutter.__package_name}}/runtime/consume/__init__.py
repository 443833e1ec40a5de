"""The hot path: pull jobs, run the handler, settle them (ack, retry, dead-letter)."""
