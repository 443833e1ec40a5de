"""What a worker tells the outside: traces, metrics, logs and health probes."""
