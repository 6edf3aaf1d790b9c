"""Slow loop references for credit/agent.py (see credit/loops/__init__.py)."""

LOOPS: dict = {}
