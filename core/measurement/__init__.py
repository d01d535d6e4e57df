"""Measuring identity and prompt following: face similarity and the evaluation protocol."""
