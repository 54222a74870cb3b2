"""Worker pools: one pool manager process per node, and the workers it runs."""
