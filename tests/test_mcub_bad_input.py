"""Bad MCUB files fail when they are loaded, before any model runs, with one line naming the file and the item.

Each row of :data:`CASES` corrupts a copy of a valid split (the ``bench`` fixture's
MCUB-4 test part): ``edit(questions, answers)`` changes the two parsed JSON lists
in place, and the loader must raise :class:`MCUBError` matching the row's pattern.
"""

import json
import re

import pytest

from mckit.eval.mcub import LETTERS, MCUBError, load_split, parse_options

Q = r"test\.json: item 'MCUB-4-test-{:04d}': "
A = r"test_answers\.json: item 'MCUB-4-test-{:04d}': "


def _prompt(records, i, old, new):
    """Replace ``old`` by ``new`` in the human turn of ``records[i]``."""
    turn = records[i]["conversations"][0]
    assert old in turn["value"]
    turn["value"] = turn["value"].replace(old, new)


def _gold(records, i, value):
    records[i]["conversations"][1]["value"] = value


def _drop_entry(records, i, key):
    del records[i]["modal_inputs"][key]


def _duplicate_answer(answers, i, value):
    extra = json.loads(json.dumps(answers[i]))
    extra["conversations"][1]["value"] = value
    answers.append(extra)


def _empty_option_b(records, i):
    turn = records[i]["conversations"][0]
    turn["value"] = re.sub(r"\( B \) [^(]*", "( B ) ", turn["value"])


def _question_file_answers(q, a):
    """Gold answers in the question file itself, the last item's missing."""
    q[:] = [json.loads(json.dumps(r)) for r in a]
    del q[-1]["conversations"][1]


#: (case, edit(questions, answers), pattern of the message, load with the answer file)
CASES = [
    # 1. a placeholder without its modal_inputs entry
    ("placeholder without entry", lambda q, a: _drop_entry(q, 3, "audio"),
     Q.format(3) + r"1 <audio> placeholder\(s\) but no modal_inputs entry 'audio'", True),
    ("placeholder without file", lambda q, a: q[0]["modal_inputs"].update(video=[]),
     Q.format(0) + r"1 <video> placeholder\(s\) but 0 video file\(s\)", True),
    ("file without placeholder", lambda q, a: _prompt(q, 1, "video : <video> .", ""),
     Q.format(1) + r"0 <video> placeholder\(s\) but 1 video file\(s\)", True),
    # 2. a question without an answer
    ("question without answer", lambda q, a: a.pop(2),
     Q.format(2) + r"no answer in .*test_answers\.json", True),
    ("mixed answers in the question file", _question_file_answers,
     Q.format(39) + r"no answer \(no gpt turn\), while other items have one", False),
    # 3. conflicting duplicate answer ids
    ("conflicting duplicate answers", lambda q, a: _duplicate_answer(a, 1, "D" if a[1]["conversations"][1]["value"]
                                                                     != "D" else "C"),
     A.format(1) + r"conflicting answers '[A-D]' and '[A-D]'", True),
    # 4. a gold answer that is not one option letter of the item
    ("answer is a sentence", lambda q, a: _gold(a, 5, "Absolutely not"),
     Q.format(5) + r"answer 'Absolutely not' is not one of the option letters ABCD", True),
    ("answer beyond the options", lambda q, a: _gold(a, 5, "E"),
     Q.format(5) + r"answer 'E' is not one of the option letters ABCD", True),
    ("answer in lower case", lambda q, a: _gold(a, 5, "b"),
     Q.format(5) + r"answer 'b' is not one of the option letters ABCD", True),
    ("empty answer", lambda q, a: _gold(a, 5, " "),
     Q.format(5) + r"answer ' ' is not one of the option letters ABCD", True),
    # 5. answers of the wrong JSON type
    ("answer is a number", lambda q, a: _gold(a, 6, 1),
     A.format(6) + r"the answer \(gpt turn\) must be a JSON string, got number 1", True),
    ("answer is a list", lambda q, a: _gold(a, 6, ["A"]),
     A.format(6) + r"the answer \(gpt turn\) must be a JSON string, got list \['A'\]", True),
    ("answer is null", lambda q, a: _gold(a, 6, None),
     A.format(6) + r"the answer \(gpt turn\) must be a JSON string, got null", True),
    ("answer record without gpt turn", lambda q, a: a[7]["conversations"].pop(),
     A.format(7) + r"no gpt turn \(the gold answer\)", True),
    # 6. duplicated question ids
    ("duplicated question ids", lambda q, a: q[9].update(id=q[4]["id"]),
     r"test\.json: duplicated item ids: 'MCUB-4-test-0004' \(2 times\)", True),
    # 7. an unknown placeholder
    ("unknown placeholder", lambda q, a: _prompt(q, 8, "<point>", "<smell>"),
     Q.format(8) + r"unknown placeholder <smell>; valid modalities: image, audio, video, point", True),
    # malformed records
    ("record is not an object", lambda q, a: q.insert(0, "MCUB-4-test-0000"),
     r"test\.json: record 0 is a string, expected a JSON object", True),
    ("record without id", lambda q, a: q[10].pop("id"),
     r"test\.json: record 10 has no 'id'", True),
    ("id of the wrong type", lambda q, a: q[10].update(id=["x"]),
     r"test\.json: record 10: 'id' must be a string or an integer, got list", True),
    ("prompt is not a string", lambda q, a: q[11]["conversations"][0].update(value=["<image>"]),
     Q.format(11) + r"the prompt \(human turn\) must be a JSON string, got list", True),
    ("no human turn", lambda q, a: q[11].update(conversations=[]),
     Q.format(11) + r"needs a human turn in 'conversations'", True),
    ("conversations not a list", lambda q, a: q[11].update(conversations="hello"),
     Q.format(11) + r"'conversations' must be a list of \{'from', 'value'\} objects", True),
    ("modal_inputs not an object", lambda q, a: q[12].update(modal_inputs=["media/x.npy"]),
     Q.format(12) + r"'modal_inputs' must be an object \{key: \[paths\]\}, got list", True),
    ("media paths not strings", lambda q, a: q[12]["modal_inputs"].update(audio=[3]),
     Q.format(12) + r"modal_inputs\['audio'\] must be a path or a list of paths", True),
    ("two keys for one modality", lambda q, a: q[12]["modal_inputs"].update(image=q[12]["modal_inputs"]["vision"]),
     Q.format(12) + r"modal_inputs has two entries for image: 'vision' and 'image'", True),
    ("unknown modal_inputs key", lambda q, a: q[12]["modal_inputs"].update(smell=["media/x.npy"]),
     Q.format(12) + r"unknown modal_inputs key 'smell'", True),
    ("missing media file", lambda q, a: q[3]["modal_inputs"].update(audio=["media/test/audio/nope.npy"]),
     Q.format(3) + r"missing audio file .*nope\.npy", True),
    ("options out of order", lambda q, a: _prompt(q, 13, "( B )", "( C )"),
     Q.format(13) + r"options are not lettered A, B, C, ... in order: \['A', 'C', 'C', 'D'\]", True),
    ("empty option", lambda q, a: _empty_option_b(q, 13),
     Q.format(13) + r"option B has no text", True),
]


def _write(bench, tmp_path, edit):
    """Copies of ``bench``'s MCUB-4 test files under ``tmp_path``, edited; returns (questions, answers) paths."""
    folder = tmp_path / "MCUB-4"
    folder.mkdir()
    (tmp_path / "media").symlink_to(bench / "media")
    questions = json.loads((bench / "MCUB-4" / "test.json").read_text())
    answers = json.loads((bench / "MCUB-4" / "test_answers.json").read_text())
    edit(questions, answers)
    (folder / "test.json").write_text(json.dumps(questions))
    (folder / "test_answers.json").write_text(json.dumps(answers))
    return folder / "test.json", folder / "test_answers.json"


def test_the_unedited_copy_loads(bench, tmp_path):
    questions, answers = _write(bench, tmp_path, lambda q, a: None)
    items = load_split(questions, answers)
    assert len(items) == 40 and all(it.answer in LETTERS for it in items)


@pytest.mark.parametrize("edit, pattern, with_answers", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_file_is_named_at_load(bench, tmp_path, edit, pattern, with_answers):
    questions, answers = _write(bench, tmp_path, edit)
    with pytest.raises(MCUBError, match=pattern) as err:
        load_split(questions, answers if with_answers else None)
    assert "\n" not in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_agreeing_duplicate_answers_and_question_file_answers_load(bench, tmp_path):
    """The same answer twice is no conflict; gold read from the question file's own gpt turns."""
    same = lambda q, a: _duplicate_answer(a, 1, a[1]["conversations"][1]["value"])  # noqa: E731
    questions, answers = _write(bench, tmp_path, same)
    assert len(load_split(questions, answers)) == 40
    own = json.loads(answers.read_text())[:40]
    questions.write_text(json.dumps(own))
    assert [it.answer for it in load_split(questions)] == [r["conversations"][1]["value"] for r in own]


def test_unanswered_questions_load_without_an_answer_file(bench, tmp_path):
    questions, _ = _write(bench, tmp_path, lambda q, a: None)
    assert all(it.answer is None for it in load_split(questions))


def test_answer_letter_in_brackets_is_read_as_the_letter(bench, tmp_path):
    questions, answers = _write(bench, tmp_path, lambda q, a: [_gold(a, 0, "(B)"), _gold(a, 1, " C. ")])
    items = load_split(questions, answers)
    assert items[0].answer == "B" and items[1].answer == "C"


OPTIONS = ["sea water", "the sky", "fur", "four wheels"]
#: (case, prompt): every one of them has the options OPTIONS.
OPTION_STYLES = [
    ("dot lines", "<image>\nWhat is it?\nA. sea water\nB. the sky\nC. fur\nD. four wheels"),
    ("bracket lines", "<image>\nWhat is it?\n(A) sea water\n(B) the sky\n(C) fur\n(D) four wheels"),
    ("bracket lines and instruction", "<image>\nWhat is it?\n(A) sea water\n(B) the sky\n(C) fur\n(D) four wheels\n"
                                      "Answer with the option's letter from the given choices directly."),
    ("dot lines and instruction", "<image> What is it?\nA. sea water\nB. the sky\nC. fur\nD. four wheels\n"
                                  "Answer with the option's letter from the given choices directly."),
    ("closing bracket lines", "<image> What is it?\nA) sea water\nB) the sky\nC) fur\nD) four wheels\n"),
    ("bracket inline", "<image> What is it? (A) sea water (B) the sky (C) fur (D) four wheels"),
    ("dot inline", "<image> What is it? A. sea water B. the sky C. fur D. four wheels"),
    ("dot inline and instruction", "<image> What is it? A. sea water B. the sky C. fur D. four wheels\nAnswer "
                                   "with the letter."),
    ("spaced brackets inline (the kit)", "image : <image> . what is it ? ( A ) sea water ( B ) the sky ( C ) fur "
                                         "( D ) four wheels . answer with the letter ."),
    ("final full stop", "<image> What is it? (A) sea water (B) the sky (C) fur (D) four wheels."),
]


@pytest.mark.parametrize("prompt", [p for _, p in OPTION_STYLES], ids=[c for c, _ in OPTION_STYLES])
def test_option_styles(prompt):
    assert parse_options(prompt) == OPTIONS


def test_prompts_without_options():
    assert parse_options("image : <image> what is this ?") == []
    assert parse_options("<image>\nDescribe it. Plan A. is fine.") == []
