"""The operator's side: the command line, status, permissions and the embedded nats-server."""
