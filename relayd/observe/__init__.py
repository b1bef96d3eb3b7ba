"""Events and their sinks: frozen event values every stage emits, the Exim-shaped main log, Prometheus metrics, the audit log and the recent-outcome memory."""
