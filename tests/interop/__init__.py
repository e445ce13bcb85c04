"""Interoperability tests against real client implementations (run by tox -e interop)."""
