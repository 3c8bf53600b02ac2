"""The engine: the one model, its editors, the router and dispatch, and completions."""
