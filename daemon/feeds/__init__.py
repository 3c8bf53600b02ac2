"""News and data feeds, the spool, and the extractors that turn items into edit requests."""
