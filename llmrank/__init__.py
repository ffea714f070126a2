"""llmrank: structured pruning by graph centrality."""
__version__ = "0.1.0"
