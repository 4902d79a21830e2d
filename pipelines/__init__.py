"""Runnable Beam pipelines and the keyturn CLI."""
