"""editd: a lifelong knowledge-editing daemon for language models.

Importing this package is cheap: heavy dependencies (torch, transformers,
faiss) are imported only by the modules that need them.
"""

__version__ = "0.1.0"
