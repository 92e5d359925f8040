"""Policies: plain Python over numbers (phase, memory, batch, strategy, scheduler, control)."""
