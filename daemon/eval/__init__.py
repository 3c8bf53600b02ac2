"""Evaluation: lifelong-editing metrics, the harness that streams edits, and reports."""
