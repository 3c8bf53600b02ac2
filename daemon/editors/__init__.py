"""Editors: the two back-ends (MELO, COMEBA-HK) and the reference baselines."""
