"""Model loading and the architecture table (the only place that knows module paths)."""
