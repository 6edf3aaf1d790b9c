"""Slow loop references for credit/tree.py (see credit/loops/__init__.py)."""

LOOPS: dict = {}
