"""Slow loop references for credit/process.py (see credit/loops/__init__.py)."""

LOOPS: dict = {}
