"""Evaluation: regional volumes, every model and baseline on the same pairs, the age sweep and brain age."""
