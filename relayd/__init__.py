"""relayd: a self-hosted SMTP relay for applications.

Data flows one way: listener -> spool -> scheduler -> router -> transport -> outcome.
See docs/flow.md for the whole path.
"""

__version__ = "0.1.0"
