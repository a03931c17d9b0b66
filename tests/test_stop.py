"""StopChecker: stop strings are caught across any fragmentation and never leak."""

import random

import pytest

from qwen3next.engine.stop import StopChecker


def expected_stop(text, stops, include):
    """Reference: feed one character at a time and stop at the first completed stop string."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop_str = max(done, key=len)  # earliest start among those ending here
            start = end - len(stop_str)
            return (text[:end] if include else text[:start]), stop_str
    return text, None


def random_split(text, rng):
    pieces, i = [], 0
    while i < len(text):
        n = rng.choice([0, 1, 1, 2, 3, 5, 8])  # empty deltas happen too
        pieces.append(text[i : i + n])
        i += n
    return pieces


def run_checker(pieces, stops, include):
    checker = StopChecker(stops, include_stop_str_in_output=include)
    emitted, matched, snapshots = "", None, []
    for piece in pieces:
        emit, stopped, match = checker.feed(piece)
        emitted += emit
        snapshots.append(emitted)
        if stopped:
            matched = match
            break
    emitted += checker.flush()
    snapshots.append(emitted)
    return emitted, matched, snapshots


CASES = [
    ("Hello world. The answer is 42.\nUser: hi", ["\nUser:"]),
    ("aaaaab and more", ["aab"]),  # a failed partial match restarts inside itself
    ("xabcd yz", ["abcd", "bc"]),  # "bc" completes before "abcd"
    ("xabcd yz", ["abcd", "abc"]),  # "abc" completes first
    ("foo bar baz", ["ar b", "bar"]),  # "bar" completes first
    ("no stop in here at all", ["STOP", "</s>"]),
    ("ends with a partial </", ["</s>"]),
    ("ends exactly with</s>", ["</s>"]),
    ("</s> at the start", ["</s>"]),
    ("日本語のテキスト。終わり。続き", ["終わり", "。続"]),
    ("tie: abc", ["abc", "bc"]),  # same end: the longer (earlier start) wins
    ("ab" * 30 + "abX", ["ababX", "abababab" + "Y"]),
]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("text,stops", CASES)
def test_random_fragmentations_never_leak(text, stops, include):
    want, want_match = expected_stop(text, stops, include)
    rng = random.Random(1234)
    for _ in range(300):
        emitted, matched, snapshots = run_checker(random_split(text, rng), stops, include)
        assert emitted == want
        assert matched == want_match
        # At every moment the client has seen a prefix of the final text, so no
        # character of a stop string (or after it) was ever shown.
        for shown in snapshots:
            assert want.startswith(shown)


def test_random_texts_and_stops():
    rng = random.Random(7)
    for _ in range(400):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        include = rng.random() < 0.5
        want, want_match = expected_stop(text, stops, include)
        emitted, matched, snapshots = run_checker(random_split(text, rng), stops, include)
        assert (emitted, matched) == (want, want_match), (text, stops, include)
        assert all(want.startswith(s) for s in snapshots)


def test_holds_back_partial_and_flushes_it():
    checker = StopChecker(["</s>"])
    assert checker.feed("hello <") == ("hello ", False, None)
    assert checker.feed("/") == ("", False, None)
    assert checker.feed("x") == ("</x", False, None)  # proven harmless: released
    assert checker.feed(" </") == (" ", False, None)
    assert checker.flush() == "</"
    assert checker.flush() == ""


def test_stop_is_final():
    checker = StopChecker(["STOP"])
    assert checker.feed("abcST") == ("abc", False, None)
    assert checker.feed("OP and more") == ("", True, "STOP")
    assert checker.feed("more text") == ("", True, "STOP")
    assert checker.flush() == ""
    assert checker.stopped and checker.matched == "STOP"


def test_include_stop_str_in_output():
    checker = StopChecker(["STOP"], include_stop_str_in_output=True)
    assert checker.feed("abcST") == ("abcST", False, None)
    assert checker.feed("OP tail") == ("OP", True, "STOP")


def test_no_stop_strings_passes_through():
    checker = StopChecker([])
    assert checker.feed("anything") == ("anything", False, None)
    assert checker.flush() == ""


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError, match="stop"):
        StopChecker(["ok", ""])
