"""The submission listener: SMTP sessions, tenant AUTH, per-session limits, policy, and turning DATA into a spooled message."""
