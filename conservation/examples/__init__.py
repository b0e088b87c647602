"""Worked examples that bring their own networks and data (see `conservation.examples.digits`)."""
