"""Operator and local-program surfaces: the control socket, relayctl, mailq, queue views, the sendmail injector and the embedded default."""
