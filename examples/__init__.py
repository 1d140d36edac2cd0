"""Runnable examples: ``examples.app`` is the scenario app, ``examples.demo`` the demo."""
