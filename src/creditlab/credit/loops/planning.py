"""Slow loop references for credit/planning.py (see credit/loops/__init__.py)."""

LOOPS: dict = {}
