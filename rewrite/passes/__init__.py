"""Graph passes, one per file, run in the order that ``rewrite.pipeline`` gives."""
