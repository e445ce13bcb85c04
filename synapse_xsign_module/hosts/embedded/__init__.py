"""The embedded (standalone) host."""
