import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sam4mllm.codec import FORMATS, ParseResult, Point, TargetPrompt, get_format

coord = st.integers(0, 999)


@st.composite
def targets(draw):
    n = draw(st.integers(0, 3))
    out = []
    for _ in range(n):
        x1, x2 = sorted(draw(st.tuples(coord, coord)))
        y1, y2 = sorted(draw(st.tuples(coord, coord)))
        pts = draw(st.lists(st.builds(Point, coord, coord, st.booleans()), max_size=4))
        out.append(TargetPrompt((x1, y1, x2, y2), tuple(pts)))
    return out


@pytest.mark.parametrize("name", sorted(FORMATS))
@given(ts=targets())
@settings(max_examples=60, deadline=None)
def test_roundtrip(name, ts):
    fmt = get_format(name)
    res = fmt.parse(fmt.encode(ts))
    assert res.valid and res.flags == ()
    assert res.no_target == (not ts)
    assert list(res.targets) == ts


@pytest.mark.parametrize("name", sorted(FORMATS))
@given(text=st.text(max_size=200))
@settings(max_examples=150, deadline=None)
def test_parser_never_raises_on_garbage(name, text):
    res = get_format(name).parse(text)
    assert isinstance(res, ParseResult)
    assert res.valid or res.reason != "ok"
    for t in res.targets:
        assert all(0 <= v <= 999 for v in t.box)
        assert t.box[0] <= t.box[2] and t.box[1] <= t.box[3]


@pytest.mark.parametrize("name", sorted(FORMATS))
@given(ts=targets(), cut=st.integers(0, 400), prefix=st.text(max_size=20))
@settings(max_examples=60, deadline=None)
def test_parser_survives_truncation_and_prefixes(name, ts, cut, prefix):
    fmt = get_format(name)
    res = fmt.parse(prefix + fmt.encode(ts)[:cut])
    for t in res.targets:
        assert all(0 <= v <= 999 for v in t.box)


def test_official_text_is_zero_padded():
    t = TargetPrompt((5, 40, 600, 999), (Point(7, 8, True), Point(9, 10, False)))
    assert get_format("official").encode([t]) == "[005,040,600,999] (007,008,1) (009,010,0)"


def test_qwen_formats_text():
    t = TargetPrompt((5, 40, 600, 999))
    assert get_format("qwen2vl").encode([t]) == "<|box_start|>(5,40),(600,999)<|box_end|>"
    assert get_format("qwenvl").encode([t]) == "<box>(5,40),(600,999)</box>"
    assert get_format("json").encode([t]) == '[{"bbox_2d": [5, 40, 600, 999]}]'


def test_no_target_and_unlabelled_question_points():
    fmt = get_format("official")
    assert fmt.encode([]) == "No object found."
    assert fmt.point_text(3, 4) == "(003,004)"
    res = fmt.parse("Sorry, the object is not in the image.")
    assert res.valid and res.no_target and not res.targets


@pytest.mark.parametrize(
    ("name", "text", "box", "flags"),
    [
        ("official", "Sure! It is at [100, 200 ,300,400] here.", (100, 200, 300, 400), ()),
        ("official", "[100,200,300,400", (100, 200, 300, 400), ("unclosed",)),
        ("official", "[300,400,100,200]", (100, 200, 300, 400), ("swapped_corners",)),
        ("official", "[-20,5,1500,7]", (0, 5, 999, 7), ("clamped",)),
        ("official", "[1.4,2.5,3,4]", (1, 3, 3, 4), ()),
        ("qwen2vl", "<|object_ref_start|>cat<|object_ref_end|><|box_start|>( 1 , 2 ) ,(3,4)", (1, 2, 3, 4),
         ("unclosed",)),
        ("qwenvl", "<ref>cat</ref><box>(30,40),(10,20)</box>", (10, 20, 30, 40), ("swapped_corners",)),
        ("json", '```json\n[{"bbox_2d": [1, 2, 3, 4], "point_2d": [[2, 3]', (1, 2, 3, 4), ("unlabelled_point",)),
    ],
)
def test_tolerated_repairs(name, text, box, flags):
    res = get_format(name).parse(text)
    assert res.valid and res.targets[0].box == box
    assert set(res.flags) == set(flags)


def test_points_attach_to_the_preceding_box_and_orphans_are_flagged():
    res = get_format("official").parse("(1,1,1) [0,0,9,9] (2,2,1) (3,3,no) [5,5,6,6] (4,4,yes)")
    assert [len(t.points) for t in res.targets] == [2, 1]
    assert res.targets[0].points[1] == Point(3, 3, False)
    assert "orphan_points" in res.flags


def test_json_points_of_several_targets():
    text = ('[{"bbox_2d": [1,2,30,40], "point_2d": [[5,6,1],[7,8,0]]}, '
            '{"bbox_2d": [50,60,70,80], "point_2d": [[55,65,1]]}]')
    res = get_format("json").parse(text)
    assert [t.points for t in res.targets] == [(Point(5, 6, True), Point(7, 8, False)), (Point(55, 65, True),)]


def test_clamping_uses_the_given_limits():
    res = get_format("json").parse('{"bbox_2d": [10, 20, 700, 500]}', limits=(639, 479))
    assert res.targets[0].box == (10, 20, 639, 479) and res.flags == ("clamped",)


@pytest.mark.parametrize(
    ("text", "reason"), [("", "empty output"), ("   ", "empty output"), ("a cat", "no box found"),
                         ("(1,2,1)", "no box found")]
)
def test_invalid_outputs_have_reasons(text, reason):
    res = get_format("official").parse(text)
    assert not res.valid and res.reason == reason


def test_huge_numbers_are_clamped_not_raised():
    res = get_format("official").parse("[" + "9" * 400 + ",0,1,1]")
    assert res.valid and "clamped" in res.flags


def test_boxes_beat_a_no_target_phrase():
    res = get_format("official").parse("No object found. [1,2,3,4]")
    assert res.valid and not res.no_target and "mixed_no_target" in res.flags


def test_unknown_format():
    with pytest.raises(KeyError, match="official"):
        get_format("nope")
