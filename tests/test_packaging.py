"""The package installs whole: every module directory is a package."""

from __future__ import annotations

import os

from twisted.trial import unittest

import synapse_xsign_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(synapse_xsign_module.__file__)))


class PackagingTest(unittest.TestCase):
    """What setup.cfg's ``packages = find:`` will ship."""

    def test_every_module_directory_is_a_package(self) -> None:
        """Each directory holding .py files has an __init__.py (else find: skips it)."""
        for dirpath, dirnames, filenames in os.walk(
            os.path.join(ROOT, "synapse_xsign_module")
        ):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if any(f.endswith(".py") for f in filenames):
                self.assertIn("__init__.py", filenames, dirpath)

    def test_migration_files_ship(self) -> None:
        """The Alembic environment and script template are package files."""
        migrations = os.path.join(ROOT, "synapse_xsign_module", "storage", "migrations")
        for name in ("env.py", "script.py.mako", "__init__.py"):
            self.assertTrue(os.path.isfile(os.path.join(migrations, name)), name)
