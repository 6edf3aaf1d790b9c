"""Token-selective shaping: hicra, ktae, ucas."""
