"""Thin CLIs, one per MLproject entry point: parse and validate, call the ``isc`` library, log.

Run one as ``python -m entrypoints.<name>`` (what MLproject does) or ``isc <command>`` (``cli.py``).
"""
