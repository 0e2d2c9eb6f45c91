"""RFC 8785 canonical JSON, and the strict parser that accepts only canonical bytes."""

from __future__ import annotations

import json

import pytest

from tensafe.security.canonical import CanonicalError, canonical_json, parse_canonical, strict_loads


@pytest.mark.parametrize(
    "value,expected",
    [
        (8.0, b"8"),  # ECMAScript number formatting, not Python's repr
        (9.259259259259259e-05, b"0.00009259259259259259"),
        (1e21, b"1e+21"),
        (1e-7, b"1e-7"),
        (-0.0, b"0"),
        (333333333.33333329, b"333333333.3333333"),
        ({"b": 1, "a": [True, None, "é"]}, '{"a":[true,null,"é"],"b":1}'.encode()),
        # RFC 8785 §3.2.3: keys sort by UTF-16 code units: U+1F600 (a surrogate pair) before U+FB33
        (
            {"\ufb33": 1, "\U0001f600": 2, "\r": 3, "1": 4},
            '{"\\r":3,"1":4,"\U0001f600":2,"\ufb33":1}'.encode(),
        ),
    ],
)
def test_canonical_json_is_rfc_8785(value, expected):
    assert canonical_json(value) == expected


def test_the_rfc_8785_example_object():
    """The example of RFC 8785 §3.2.2 (numbers, literals, escapes)."""
    source = ('{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
              '"string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
              '"literals": [null, true, false]}')
    expected = ('{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
                '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}')
    assert canonical_json(json.loads(source)) == expected.encode()


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), 2**53, -(2**53), {1: "a"}, object()],
    ids=["nan", "inf", "int past 2^53", "negative int past 2^53", "non-string key", "object"],
)
def test_values_without_a_canonical_form_are_refused(value):
    with pytest.raises(CanonicalError):
        canonical_json(value)


@pytest.mark.parametrize(
    "data,why",
    [
        (b'{"a":1,"a":2}', "duplicate key 'a'"),
        (b'{"a":NaN}', "NaN is not JSON"),
        (b'{"a":1e999}', "out of range"),
        (b'{"a":' + b"1" * 5000 + b"}", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
        (b"[" * 65 + b"]" * 65, "nested deeper"),
        (b"\xff", "not UTF-8"),
        (b"{", "not JSON"),
    ],
)
def test_the_strict_parser_refuses_without_crashing(data, why):
    with pytest.raises(CanonicalError, match=why):
        strict_loads(data)


@pytest.mark.parametrize(
    "data", [b'{"b":1,"a":2}', b'{"a": 1}', b'{"a":8.0}', b'{"a":"\\u0041"}', b' {"a":1}']
)
def test_only_canonical_bytes_parse_as_canonical(data):
    assert strict_loads(data)  # valid JSON…
    with pytest.raises(CanonicalError, match="canonical form"):
        parse_canonical(data)  # …but not the bytes a signer wrote
    assert parse_canonical(canonical_json(strict_loads(data))) == strict_loads(data)
