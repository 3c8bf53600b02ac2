"""COMEBA-HK: hook layers with consecutive closed-form batch updates and a scope gate."""
