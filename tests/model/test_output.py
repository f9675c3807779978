"""to_session_time: a model's word times (relative to its audio) become session time."""

from __future__ import annotations

from service.model.output import to_session_time


def test_words_move_by_the_segment_start_and_nothing_else_changes() -> None:
    output = {
        "text": "hello there",
        "words": [
            {"word": "hello", "start": 0.0, "end": 0.42, "probability": 0.9},
            {"word": "there", "start": 0.5, "end": 0.9, "probability": 0.8},
        ],
        "language": "en",
    }
    shifted = to_session_time(output, 2.6)
    assert shifted["words"] == [
        {"word": "hello", "start": 2.6, "end": 3.02, "probability": 0.9},
        {"word": "there", "start": 3.1, "end": 3.5, "probability": 0.8},
    ]
    assert (shifted["text"], shifted["language"]) == ("hello there", "en")
    # The model's own mapping is not modified (it may be reused or cached by the model).
    assert output["words"][0]["start"] == 0.0


def test_times_are_rounded_to_the_millisecond() -> None:
    # 0.1 + 0.2 is 0.30000000000000004 in floating point; the JSON should say 0.3.
    shifted = to_session_time({"words": [{"word": "a", "start": 0.1, "end": 0.2}]}, 0.2)
    assert shifted["words"] == [{"word": "a", "start": 0.3, "end": 0.4}]


def test_outputs_without_words_are_returned_as_they_are() -> None:
    for output in ({"count": 23232}, {"text": "", "words": []}, {"words": "not a list"}):
        assert to_session_time(output, 5.0) is output


def test_words_of_another_shape_pass_through() -> None:
    output = {"words": ["plain", {"word": "x", "start": "soon"}, {"word": "y", "start": True}]}
    assert to_session_time(output, 1.0)["words"] == output["words"]
