"""Agent / structure-aware group estimators: stratified (and later gigpo, igpo)."""
