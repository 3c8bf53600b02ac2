"""Drift validation: probe sets, base scores, drift scoring and isolation of damaging edits."""
