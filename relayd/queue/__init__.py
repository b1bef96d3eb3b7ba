"""The durable queue: spool files with group commit, queue ids, free-space reserve, and the scheduler that decides what is due."""
