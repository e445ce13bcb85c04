"""Canonical JSON: orjson's fast path writes exactly the standard encoder's text."""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.trial import unittest

from synapse_xsign_module.jsonutil import (
    canonical_bytes,
    canonical_json,
    signed_content,
    strip_signatures,
)


def standard(value: Any) -> str:
    """Canonical JSON as the standard library writes it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


#: Characters whose escaping or order differs between careless encoders.
TRICKY = [chr(i) for i in range(0x80)] + [
    "\u0085",
    "\u00e9",
    "\u00ff",
    "\u0100",
    "\u2028",
    "\u2029",
    "\ud7ff",
    "\ue000",
    "\ufffe",
    "\uffff",
    "\U00010000",
    "\U0001f511",
]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return "".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 8)))
    if roll < 0.4:
        return rng.randint(-(2**53) + 1, 2**53 - 1)
    if roll < 0.45:
        return rng.choice([True, False, None])
    if roll < 0.7:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        "".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 4))): random_value(
            rng, depth + 1
        )
        for _ in range(rng.randint(0, 5))
    }


class CanonicalJsonTest(unittest.TestCase):
    def test_random_values_match_the_standard_encoder(self) -> None:
        """Escapes, key order and UTF-8 over 3,000 random values."""
        rng = random.Random(8)
        for _ in range(3000):
            value = {"k": random_value(rng), "m": random_value(rng)}
            text = standard(value)
            self.assertEqual(canonical_json(value), text)
            self.assertEqual(canonical_bytes(value), text.encode("utf-8"))
            self.assertEqual(signed_content(text), (value, text.encode("utf-8")))

    def test_key_order_is_by_code_point(self) -> None:
        value = {"\U0001f511": 1, "\uffff": 2, "z": 3, "\u00e9": 4, "Z": 5, "": 6}
        expected = '{"":6,"Z":5,"z":3,"\u00e9":4,"\uffff":2,"\U0001f511":1}'
        self.assertEqual(canonical_json(value), expected)
        self.assertEqual(canonical_bytes(value), expected.encode("utf-8"))

    def test_escapes(self) -> None:
        value = {"s": 'q"b\\n\n\t\x01\x1f\x7f\u2028'}
        expected = '{"s":"q\\"b\\\\n\\n\\t\\u0001\\u001f\x7f\u2028"}'
        self.assertEqual(canonical_json(value), expected)

    def test_floats_are_written_as_the_standard_encoder_writes_them(self) -> None:
        """orjson writes 1e16 and 1e-7 differently; such values keep the
        standard encoder's text (and the signatures made over it)."""
        value = {"a": [1e16, 1e-07, 0.5, -0.0], "b": {"c": 2.5}}
        self.assertEqual(canonical_json(value), standard(value))
        self.assertIn("1e+16", canonical_json(value))
        self.assertEqual(canonical_bytes(value), standard(value).encode("utf-8"))

    def test_what_orjson_refuses_behaves_as_before(self) -> None:
        for value in ({"a": 2**70}, {"a": -(2**64)}, {1: "x"}, {"b": (1, 2)}):
            self.assertEqual(canonical_json(value), standard(value), value)
        lone = {"a": "\ud800"}
        self.assertEqual(canonical_json(lone), standard(lone))
        with self.assertRaises(UnicodeEncodeError):
            canonical_bytes(lone)

    def test_signed_content_matches_the_standard_library(self) -> None:
        """Parsed without signatures and unsigned, and the canonical bytes of
        that, for stored text with floats, big integers or whitespace too."""
        for text in (
            '{"keys":{"ed25519:D":"k"},"signatures":{"@a:x":{"ed25519:D":"s"}}}',
            '{"n":1e16,"unsigned":{"x":1},"z":[0.5]}',
            '{"big":123456789012345678901234567890,"signatures":{}}',
            '{"i":[18446744073709551616,-9223372036854775809],"f":[0.1,-0.0]}',
            '{ "n" : [ 1 , 2.5e-7 ] , "s" : "caf\u00e9" }',
        ):
            expected = strip_signatures(json.loads(text))
            self.assertEqual(
                signed_content(text),
                (expected, standard(expected).encode("utf-8")),
                text,
            )
        with self.assertRaises(ValueError):
            signed_content("{not json")
