"""The chat probe's scoring: whole words, spellings, case."""

from mosaic_export.method.chat_probe import QUESTIONS, answered, score


def test_an_answer_counts_as_a_whole_word_in_any_spelling():
    assert answered("The capital of France is Paris.", ("paris",))
    assert answered("2 + 2 = 4", ("4", "four"))
    assert answered("It is four.", ("4", "four"))
    assert not answered("It is 42.", ("4", "four"))  # a digit inside a number is not the answer
    assert not answered("Parisian food", ("paris",))
    assert answered("They take in carbon dioxide (CO2).", ("carbon dioxide", "co2"))
    assert not answered("", ("blue",))


def test_score_counts_per_question():
    replies = [accepted[0] for _, accepted in QUESTIONS]
    replies[0] = "I do not know."
    replies[1] = " "
    result = score(replies)
    assert len(QUESTIONS) == 20 and result["questions"] == 20
    assert result["answered"] == 18 and not result["rows"][0]["answered"]
    assert result["replied"] == 19
