"""Process-reward credit: sum_form, pure, capo, prime, oprl, tp_grpo."""
