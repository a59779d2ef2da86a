"""The E2E slot error script (train.e2e_slots) and the MR-contradicting rejected answers of the DPO experiment."""

import random

import pytest

from train import e2e_slots as S

MR = "name[The Eagle], eatType[coffee shop], food[French], priceRange[cheap], area[riverside], familyFriendly[no]"


def test_parse_mr_and_refuses_what_is_not_one():
    assert S.parse_mr(MR)["priceRange"] == "cheap" and len(S.parse_mr(MR)) == 6
    assert S.parse_mr("name[Aromi] | customer rating[5 out of 5]") == {"name": "Aromi", "customer rating": "5 out of 5"}
    with pytest.raises(ValueError, match="unknown E2E slot"):
        S.parse_mr("colour[red]")
    with pytest.raises(ValueError, match="not an E2E meaning representation"):
        S.parse_mr("hello")


@pytest.mark.parametrize(
    "text,missing,wrong,added",
    [
        ("The Eagle is a cheap French coffee shop by the riverside that is not family friendly.", 0, 0, 0),
        ("The Eagle is a cheap French coffee shop that is not family friendly.", 1, 0, 0),  # area dropped
        ("The Eagle is a cheap Italian coffee shop by the river. It is not kid friendly.", 0, 1, 0),  # food swapped
        ("The Eagle is a cheap French coffee shop by the river, not family friendly, near Clare Hall.", 0, 0, 1),
        ("Zizzi is a cheap French coffee shop by the riverside. No children.", 0, 1, 0),  # name swapped
        ("The Eagle is an expensive French coffee shop by the riverside for families.", 0, 2, 0),
    ],
)
def test_slot_errors_count_missing_wrong_and_added(text, missing, wrong, added):
    e = S.slot_errors(MR, text)
    assert (e.missing, e.wrong, e.added) == (missing, wrong, added), S.realised(text, S.parse_mr(MR))
    assert e.ser == pytest.approx((missing + wrong + added) / 6)


def test_venue_names_do_not_count_as_other_slots():
    """'Raja Indian Cuisine' is a place, not Indian food; 'Café Brazil' not a coffee shop."""
    e = S.slot_errors("name[Aromi], near[Raja Indian Cuisine]", "Aromi is near Raja Indian Cuisine.")
    assert e.errors == 0
    assert S.slot_errors("name[Aromi], near[Café Brazil]", "Aromi is near Café Brazil.").errors == 0


def test_rejected_answers_contradict_the_mr():
    rng = random.Random(0)
    ref = "The Eagle is a cheap French coffee shop by the riverside. It is not family friendly."
    kinds = set()
    for _ in range(30):
        text, kind = S.rejected_answer(MR, ref, rng)
        kinds.add(kind)
        assert S.slot_errors(MR, text).errors > S.slot_errors(MR, ref).errors
    assert kinds == {"swap", "drop", "invent"}


def test_corpus_ser():
    out = S.corpus_ser([MR, "name[Aromi]"], ["The Eagle is a cheap French coffee shop.", "Aromi."])
    assert out["slots"] == 7 and out["ser"] == pytest.approx(2 / 7) and out["missing"] == pytest.approx(2 / 7)
    with pytest.raises(ValueError, match="2 MRs but 1 texts"):
        S.corpus_ser([MR, MR], ["x"])
