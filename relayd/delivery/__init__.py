"""Delivery: route a message, walk its chain of upstream transports through the gates, classify each reply, retry, and bounce."""
