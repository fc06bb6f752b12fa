"""Prompt tags, infotext round trip and card HTML escaping (pure logic)."""

from __future__ import annotations

import types

import pytest

from lib_ostaf.errors import InputError
from lib_ostaf.webui import prompt_tags as pt
from lib_ostaf.webui.cards import card_description, error_html, result_html
from lib_ostaf.webui.registry import AdapterEntry


@pytest.mark.parametrize(
    "items,name,weight",
    [
        (["style"], "style", None),
        (["style", "0.8"], "style", 0.8),
        ([" my name ", "-1.5"], "my name", -1.5),
        (["a", ""], "a", None),
        (["a", "1e-1"], "a", 0.1),
    ],
)
def test_request_from_items(items, name, weight):
    r = pt.request_from_items(items)
    assert (r.name, r.weight, r.source) == (name, weight, "tag")


@pytest.mark.parametrize(
    "items,match",
    [
        ([""], "needs an adapter name"),
        (["a", "abc"], "must be a number"),
        (["a", "nan"], "number"),
        (["a", "inf"], "number"),
        (["a", "1", "2"], "not a dial"),
        (["a", "1", "shape"], "not a dial"),
        (["a", "1", "colour=2"], "not a dial"),
        (["a", "1", "shape=x"], "shape must be a number"),
        (["a", "1", "shape=1", "SHAPE=2"], "given twice"),
        (["a", "1", "start=0.8", "end=0.2"], "0 ≤ start < end ≤ 1"),
        (["a", "1", "end=1.5"], "0 ≤ start < end ≤ 1"),
        (["shape=1"], "name comes first"),
    ],
)
def test_bad_tags(items, match):
    with pytest.raises(InputError, match=match):
        pt.request_from_items(items)


def test_find_strip_format():
    text = "a <ostaf:x:0.5> cat <lora:y:1> <OSTAF:z>"
    assert pt.find_tags(text) == ["x:0.5", "z"]
    clean, removed = pt.strip_tags(text)
    assert clean == "a  cat <lora:y:1> " and removed == ["<ostaf:x:0.5>", "<OSTAF:z>"]
    assert pt.format_tag("x", 1) == "<ostaf:x:1>" and pt.format_tag("x") == "<ostaf:x>"
    assert [pt.format_weight(w) for w in (1, 0.75, 1 / 3, -0.0, 2.5e-5)] == [
        "1",
        "0.75",
        "0.3333",
        "0",
        "0",
    ]


def test_infotext_round_trip():
    entries = [("style a", 0.8, "0123456789ab"), ("b(2)", -1.0, None), ("c.d+e", 1.25, "ffff")]
    text = pt.format_infotext(entries)
    assert text == "style a:0.8 (0123456789ab), b(2):-1, c.d+e:1.25 (ffff)"
    assert pt.parse_infotext(text) == entries
    assert pt.parse_infotext("garbage, x:notnum, ok:2") == [("ok", 2.0, None)]
    # what the accordion gets back: only adapters the pasted prompt does not tag already
    params = {"Prompt": "cat <ostaf:style a:0.8>", pt.INFOTEXT_KEY: text}
    assert pt.untagged_from_infotext(params) == [
        ("b(2)", -1.0, pt.Dials()),
        ("c.d+e", 1.25, pt.Dials()),
    ]
    assert pt.untagged_from_infotext({"Prompt": "x"}) == []


def test_dials_parse_format_and_round_trip():
    r = pt.request_from_items(["cat", "1", "shape=0.6", "Appearance=1.2", "start=0.2", "end=0.8"])
    assert (r.name, r.weight) == ("cat", 1.0)
    assert r.dials == pt.Dials((("shape", 0.6), ("appearance", 1.2)), 0.2, 0.8)
    assert r.dials.scheduled and r.dials.part_weight("shape", 1) == 0.6
    assert r.dials.part_weight("style", 0.9) == 0.9  # a part left out takes λ
    tag = pt.format_tag(r.name, r.weight, r.dials)
    assert tag == "<ostaf:cat:1:shape=0.6:appearance=1.2:start=0.2:end=0.8>"
    assert pt.request_from_items(pt.find_tags(tag)[0].split(":")) == r
    # the file's preferred λ with dials: an empty positional item
    only = pt.request_from_items(["cat", "", "end=0.5"])
    assert only.weight is None and only.dials == pt.Dials((), 0.0, 0.5)
    assert pt.format_tag("cat", None, only.dials) == "<ostaf:cat::end=0.5>"
    assert pt.request_from_items(["cat", "end=0.5"]) == only  # λ may be left out entirely
    # infotext keeps the dials; the 3-field reader stays as before
    text = pt.format_infotext([("cat", 1.0, "abc", r.dials), ("dog", 0.5, None)])
    assert text == "cat:1:shape=0.6:appearance=1.2:start=0.2:end=0.8 (abc), dog:0.5"
    assert pt.parse_infotext_dials(text) == [
        ("cat", 1.0, "abc", r.dials),
        ("dog", 0.5, None, pt.Dials()),
    ]
    assert pt.parse_infotext(text) == [("cat", 1.0, "abc"), ("dog", 0.5, None)]


def test_negative_prompt_tags_are_stripped_with_a_warning():
    p = types.SimpleNamespace(
        all_negative_prompts=["bad <ostaf:x:1>", "ok", "<ostaf:x:1><ostaf:y>"],
        negative_prompt="bad <ostaf:x:1>",
    )
    messages = pt.strip_negative_tags(p)
    assert p.all_negative_prompts == ["bad ", "ok", ""] and p.negative_prompt == "bad "
    assert len(messages) == 2 and "<ostaf:x:1> in the negative prompt is ignored" in messages[0]


def test_card_html_is_escaped():
    hostile = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    e = AdapterEntry(
        name="n",
        path=None,
        size=1,
        method="attribute",
        attribute=hostile,
        family="sd1",
        description=hostile,
    )
    as_html = card_description(e, as_html=True)
    assert "<script" not in as_html and "<img" not in as_html and "&lt;script&gt;" in as_html
    assert "<span class='ostaf-badge'>attribute</span>" in as_html
    plain = card_description(e, as_html=False)  # the WebUI escapes plain text itself
    assert plain.startswith("[attribute]")
    assert "<script" not in error_html(hostile)
    card = result_html({"name": hostile, "path": "/x/<b>.safetensors", "size": 2048})
    assert "<script" not in card and "&lt;b&gt;" in card and "2.0 KiB" in card
