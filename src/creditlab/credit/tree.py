"""Prefix-tree estimators over a group's responses: tempo, treepo."""
