"""MELO: non-overlapping LoRA blocks routed by a faiss neuron-key index."""
