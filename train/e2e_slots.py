"""E2E NLG slot error rate: how many of a meaning representation's slot values a text misses, gets wrong or adds.

    python -m train.e2e_slots predictions.jsonl        # rows {"mr": ..., "text": ...}: prints the SER

An E2E meaning representation (MR) is ``name[The Eagle], eatType[coffee shop], food[French], ...``: up to eight
slots (name, eatType, food, priceRange, customer rating, area, familyFriendly, near). As in the E2E challenge's
slot-error measure (Dušek, Howcroft and Rieser 2019, "Semantic noise matters"), each slot value of the MR is looked
for in the text with hand-written patterns (paraphrases included: "kid friendly", "in the centre of the city",
"below £20"):

- **missing**: no value of the slot is mentioned;
- **wrong**: another value of the slot is mentioned instead (``food[French]`` but the text says Italian);
- **added**: a slot absent from the MR is mentioned (the text names a price range the MR does not give).

``SER = (missing + wrong + added) / slots of the MR``, summed over texts for a corpus figure. The patterns are
heuristics: :func:`slot_errors` on the E2E references themselves gives a floor that a perfect system cannot go
below (reported beside every score by :mod:`train.experiment`).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass

from lora_jax.errors import DataError

# The E2E ontology (training, development and test sets together), so that a value the development set never
# uses is still recognised as wrong or added.
NAMES = [
    "Alimentum",
    "Aromi",
    "Bibimbap House",
    "Blue Spice",
    "Browns Cambridge",
    "Clowns",
    "Cocum",
    "Cotto",
    "Fitzbillies",
    "Giraffe",
    "Green Man",
    "Loch Fyne",
    "Midsummer House",
    "Strada",
    "Taste of Cambridge",
    "The Cambridge Blue",
    "The Cricketers",
    "The Dumpling Tree",
    "The Eagle",
    "The Golden Curry",
    "The Golden Palace",
    "The Mill",
    "The Olive Grove",
    "The Phoenix",
    "The Plough",
    "The Punter",
    "The Rice Boat",
    "The Twenty Two",
    "The Vaults",
    "The Waterman",
    "The Wrestlers",
    "Travellers Rest Beefeater",
    "Wildwood",
    "Zizzi",
]
NEAR = [
    "All Bar One",
    "Avalon",
    "Burger King",
    "Café Adriatic",
    "Café Brazil",
    "Café Rouge",
    "Café Sicilia",
    "Clare Hall",
    "Crowne Plaza Hotel",
    "Express by Holiday Inn",
    "Rainbow Vegetarian Café",
    "Raja Indian Cuisine",
    "Ranch",
    "The Bakers",
    "The Portland Arms",
    "The Rice Boat",
    "The Sorrento",
    "Yippee Noodle Bar",
]

_RATING = r"(?:customer[- ])?(?:rat(?:ing|ed|es)|review|star)"
# slot -> value -> pattern (case-insensitive) of the value's realisations
PATTERNS: dict[str, dict[str, str]] = {
    "eatType": {
        "coffee shop": r"coffee[- ]?shop|\bcaf[eé]\b|coffee house",
        "pub": r"\bpubs?\b",
        "restaurant": r"restaurant|\bdiner\b|eatery",
    },
    "food": {
        "Chinese": r"chinese",
        "English": r"english|british",
        "Fast food": r"fast[- ]?food",
        "French": r"french",
        "Indian": r"indian",
        "Italian": r"italian",
        "Japanese": r"japanese|sushi",
    },
    "priceRange": {
        "cheap": r"\bcheap|inexpensive|low[- ]cost|low[- ]pric|affordabl|budget",
        "less than £20": r"(?:less than|under|below|lower than|up to|within) (?:£ ?20|20 ?(?:£|pounds|gbp))"
        r"|£ ?20 or less|cheap",
        "moderate": r"moderate|mid[- ]?(?:range|pric)|average[- ]pric|average price|reasonabl|fair(?:ly)? pric",
        "£20-25": r"£ ?20 ?(?:-|–|to) ?£? ?25|20 ?(?:-|to) ?25|twenty (?:to|-) twenty[- ]five",
        "high": r"high[- ]pric|expensive|pricey|high price|costly|high[- ]end|upscale|high cost",
        "more than £30": r"(?:more than|over|above|greater than|exceeds?|higher than|in excess of) (?:£ ?30|30 ?"
        r"(?:£|pounds|gbp))|£ ?30 (?:or|and) (?:more|above|over|up)|£ ?30\+|expensive",
    },
    "customer rating": {
        "1 out of 5": r"\b1 out of 5|\bone out of five|\b1 star|one[- ]star|\b1/5",
        "3 out of 5": r"\b3 out of 5|\bthree out of five|\b3 star|three[- ]star|\b3/5",
        "5 out of 5": r"\b5 out of 5|\bfive out of five|\b5 star|five[- ]star|\b5/5",
        "low": rf"\b(?:low|poor(?:ly)?|bad(?:ly)?)\b[\w -]{{0,12}}{_RATING}|{_RATING}[\w -]{{0,20}}\b(?:low|poor)",
        "average": rf"\b(?:average|mediocre|decent|ok(?:ay)?)\b[\w -]{{0,12}}{_RATING}|{_RATING}[\w -]{{0,20}}"
        r"\baverage",
        "high": rf"\b(?:high(?:ly)?|excellent|great|good|top)\b[\w -]{{0,12}}{_RATING}|{_RATING}[\w -]{{0,20}}"
        r"\b(?:high|excellent)",
    },
    "area": {
        "city centre": r"city cent(?:re|er)|cent(?:re|er) of (?:the )?(?:city|town)|town cent(?:re|er)"
        r"|\bcentral|\bdowntown|in the cent(?:re|er)",
        "riverside": r"riverside|\briver\b|waterfront",
    },
    "familyFriendly": {
        # negation first: "not family friendly", "isn't kid friendly", "not for families", "adults only"
        "no": r"(?:\bnot?\b|n't|\bnon|\bun)[- ](?:\w+ ){0,3}?(?:family|kid|child|children)"
        r"|(?:not|n't)\b[\w ]{0,25}\b(?:famil|kids|child)|adults?[- ]only|no (?:kids|children|families)"
        r"|(?:family|kid|child)[- ]unfriendly|(?:family|kid|child)[- ]friendly[\w ]{0,6}\bno\b",
        "yes": r"(?:family|kid|child|children)[- ]?friendly|famil(?:y|ies)|\bkids\b|\bchildren\b|\bchild\b",
    },
}

SLOTS = ["name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"]


def parse_mr(mr: str) -> dict[str, str]:
    """``'name[The Eagle], food[French]'`` -> ``{'name': 'The Eagle', 'food': 'French'}``; raises
    ``ValueError`` for an unknown slot or a text that is not an MR."""
    slots = {}
    for m in re.finditer(r"\s*([A-Za-z ]+?)\s*\[([^\]]*)\]\s*(?:,|\||$)", mr):
        slot, value = m.group(1).strip(), m.group(2).strip()
        if slot not in SLOTS:
            raise DataError(f"unknown E2E slot {slot!r} in MR {mr!r} (slots: {SLOTS})")
        slots[slot] = value
    if not slots:
        raise DataError(f"{mr!r} is not an E2E meaning representation (slot[value], ...)")
    return slots


def _mentions(text: str, names: list[str]) -> tuple[set[str], str]:
    """The names of ``names`` that ``text`` mentions, and the text with them blanked out (so that "Raja Indian
    Cuisine" does not also count as Indian food, nor "Café Brazil" as a coffee shop)."""
    found = set()
    for n in sorted(names, key=len, reverse=True):
        pattern = re.compile(re.escape(n), re.IGNORECASE)
        if pattern.search(text):
            found.add(n)
            text = pattern.sub(" ", text)
    return found, text


def realised(text: str, mr: dict[str, str]) -> dict[str, set[str]]:
    """The values of each slot that ``text`` mentions (``name`` / ``near``: known venue names, the MR's own
    included)."""
    names = list(dict.fromkeys(NAMES + [mr["name"]] if "name" in mr else NAMES))
    near = list(dict.fromkeys(NEAR + ([mr["near"]] if "near" in mr else [])))
    # A venue the MR names as near counts as near, whatever list it is on (and likewise for name).
    found_near, rest = _mentions(text, [n for n in near if n != mr.get("name")])
    found_names, rest = _mentions(rest, [n for n in names if n not in found_near])
    out: dict[str, set[str]] = {"name": found_names, "near": found_near}
    low = rest.lower()
    for slot, values in PATTERNS.items():
        hits = {v for v, p in values.items() if re.search(p, low)}
        if slot == "familyFriendly" and "no" in hits:
            hits = {"no"}
        out[slot] = hits
    return out


@dataclass
class SlotErrors:
    slots: int
    missing: int
    wrong: int
    added: int

    @property
    def errors(self) -> int:
        return self.missing + self.wrong + self.added

    @property
    def ser(self) -> float:
        return self.errors / max(self.slots, 1)


# Values that one wording realises together: a text saying "cheap" realises priceRange[cheap] and
# priceRange[less than £20] alike; neither is then wrong for the other.
_EQUIVALENT = {
    ("priceRange", "cheap"): {"less than £20"},
    ("priceRange", "less than £20"): {"cheap"},
    ("priceRange", "high"): {"more than £30"},
    ("priceRange", "more than £30"): {"high"},
    ("priceRange", "moderate"): {"£20-25"},
    ("priceRange", "£20-25"): {"moderate"},
    ("customer rating", "5 out of 5"): {"high"},
    ("customer rating", "high"): {"5 out of 5"},
    ("customer rating", "1 out of 5"): {"low"},
    ("customer rating", "low"): {"1 out of 5"},
    ("customer rating", "3 out of 5"): {"average"},
    ("customer rating", "average"): {"3 out of 5"},
}


def slot_errors(mr: str | dict[str, str], text: str) -> SlotErrors:
    """Missing, wrong and added slot values of ``text`` against ``mr`` (see the module docstring)."""
    slots = parse_mr(mr) if isinstance(mr, str) else dict(mr)
    found = realised(text, slots)
    missing = wrong = added = 0
    for slot, value in slots.items():
        hits = found.get(slot, set())
        if value in hits:
            others = hits - {value} - _EQUIVALENT.get((slot, value), set())
            wrong += bool(others) and slot not in ("name", "near")
        elif hits - _EQUIVALENT.get((slot, value), set()):
            wrong += 1
        elif hits:
            pass  # an equivalent wording ("cheap" for less than £20)
        else:
            missing += 1
    for slot in SLOTS:
        if slot not in slots and found.get(slot):
            added += 1
    return SlotErrors(len(slots), missing, wrong, added)


def corpus_ser(mrs: list[str], texts: list[str]) -> dict[str, float]:
    """Corpus slot error rate of ``texts`` (one per MR): the summed errors over the summed slots, and each
    kind's share."""
    if len(mrs) != len(texts):
        raise DataError(f"corpus_ser: {len(mrs)} MRs but {len(texts)} texts")
    errs = [slot_errors(m, t) for m, t in zip(mrs, texts)]
    slots = sum(e.slots for e in errs)
    out = {
        "ser": sum(e.errors for e in errs) / max(slots, 1),
        "slots": slots,
        "texts": len(texts),
        "texts_with_errors": sum(e.errors > 0 for e in errs),
    }
    for kind in ("missing", "wrong", "added"):
        out[kind] = sum(getattr(e, kind) for e in errs) / max(slots, 1)
    return out


# ------------------------------------------------------------------------------------- preference pairs
#
# A rejected answer that contradicts the MR, made from a reference (the chosen answer) by one edit; an edit is kept
# only when :func:`slot_errors` counts more errors for it than for the reference.

VALUES: dict[str, list[str]] = {"name": NAMES, "near": NEAR, **{s: list(v) for s, v in PATTERNS.items()}}
_INVENT = {
    "food": "It serves {} food.",
    "area": "It is located in the {} area.",
    "eatType": "It is a {}.",
    "near": "It is near {}.",
    "customer rating": "It has a customer rating of {}.",
    "priceRange": "It has a {} price range.",
    "familyFriendly": {"yes": "It is family friendly.", "no": "It is not family friendly."},
}


def _swap(mr: dict[str, str], ref: str, rng) -> str | None:
    """The reference with one slot value that it spells as in the MR replaced by another value of that slot."""
    spelled = [s for s, v in mr.items() if s != "familyFriendly" and len(v) > 3 and v.lower() in ref.lower()]
    if not spelled:
        return None
    slot = rng.choice(spelled)
    value = mr[slot]
    other = rng.choice([v for v in VALUES[slot] if v.lower() != value.lower() and v not in mr.values()])
    return re.sub(re.escape(value), other, ref, flags=re.IGNORECASE)


def _drop(mr: dict[str, str], ref: str, rng) -> str | None:
    """The reference without one of its sentences after the first (which names the venue)."""
    sentences = [t for t in re.split(r"(?<=[.!?])\s+", ref.strip()) if t]
    if len(sentences) < 2:
        return None
    k = rng.randrange(1, len(sentences))
    return " ".join(sentences[:k] + sentences[k + 1 :])


def _invent(mr: dict[str, str], ref: str, rng) -> str | None:
    """The reference with a sentence stating a slot the MR does not have."""
    free = [s for s in _INVENT if s not in mr]
    if not free:
        return None
    slot = rng.choice(free)
    value = rng.choice(VALUES[slot])
    template = _INVENT[slot]
    sentence = template[value] if isinstance(template, dict) else template.format(value)
    return ref.rstrip() + (" " if ref.rstrip().endswith((".", "!", "?")) else ". ") + sentence


CORRUPTIONS = {"swap": _swap, "drop": _drop, "invent": _invent}


def rejected_answer(mr: str, ref: str, rng) -> tuple[str, str] | None:
    """``(rejected, kind)``: ``ref`` made to contradict ``mr`` by one of :data:`CORRUPTIONS` (a value swapped, a
    sentence dropped, a slot invented; tried in a random order), verified by :func:`slot_errors` to have more
    errors than ``ref``; ``None`` when no edit does."""
    slots = parse_mr(mr)
    base = slot_errors(slots, ref).errors
    kinds = list(CORRUPTIONS)
    rng.shuffle(kinds)
    for kind in kinds:
        text = CORRUPTIONS[kind](slots, ref, rng)
        if text and text != ref and slot_errors(slots, text).errors > base:
            return text, kind
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        print('usage: python -m train.e2e_slots predictions.jsonl  (rows {"mr": ..., "text": ...})', file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in open(argv[0]) if line.strip()]
    print(json.dumps(corpus_ser([r["mr"] for r in rows], [r["text"] for r in rows]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
