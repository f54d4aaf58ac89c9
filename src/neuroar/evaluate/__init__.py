"""Evaluation: image metrics inside the brain (later: volumes, brain age, reports)."""
