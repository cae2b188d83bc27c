"""HTTP routers, one per resource; each stays thin and calls plain functions."""
