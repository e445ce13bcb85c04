"""Responses that splice stored JSON in without decoding it."""

from __future__ import annotations

import json

from twisted.trial import unittest

from synapse_xsign_module.http.base import JsonWithRaw, RawJson, encode_json


class RawJsonTest(unittest.TestCase):
    """encode_json writes RawJson leaves verbatim."""

    def test_raw_leaves_are_spliced(self) -> None:
        """A body with raw leaves encodes to the same JSON as the decoded body."""
        stored = json.dumps({"b": [1, 2], "a": 'é"\\'}, ensure_ascii=False)
        body = JsonWithRaw(
            {"x": {"u": RawJson(stored), "v": {"w": 1}}, "y": [], "z": "é"}
        )
        decoded = json.loads(encode_json(body))
        self.assertEqual(
            decoded,
            {"x": {"u": json.loads(stored), "v": {"w": 1}}, "y": [], "z": "é"},
        )

    def test_plain_body_is_unchanged(self) -> None:
        """A plain dict is encoded as compact JSON, RawJson there being a string."""
        self.assertEqual(encode_json({"a": RawJson("{}")}), b'{"a":"{}"}')
