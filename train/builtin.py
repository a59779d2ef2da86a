"""Small tasks the project generates itself, so that the default job needs no downloaded data.

``restaurants``: data-to-text in the style of the E2E NLG challenge. A meaning representation (MR) such as
``name[The Mill] | eatType[pub] | food[Italian] | area[riverside]`` is to be verbalised as a sentence. The
references come from hand-written templates with varied word order, so the mapping is learnable but not a
copy: a pretrained LM has to learn the MR format, which attributes to mention and how.

``sentiment``: short product/film review sentences built from positive and negative phrase lists, for
sequence classification.
"""

from __future__ import annotations

import random

NAMES = [
    "The Mill",
    "The Eagle",
    "Blue Spice",
    "The Punter",
    "Green Man",
    "The Vaults",
    "Aromi",
    "Zizzi",
    "The Olive Grove",
    "Cotto",
    "The Phoenix",
    "Giraffe",
    "Loch Fyne",
    "The Wrestlers",
    "Fitzbillies",
    "Strada",
    "The Cricketers",
    "Browns Cambridge",
    "The Golden Palace",
    "Wildwood",
    "Midsummer House",
    "The Rice Boat",
    "Alimentum",
    "Bibimbap House",
    "The Dumpling Tree",
    "Clowns",
    "Taste of Cambridge",
    "The Twenty Two",
    "Cocum",
    "The Waterman",
    "Travellers Rest Beefeater",
    "The Plough",
    "Caffe Nero",
    "The Cambridge Blue",
    "Bar Crudo",
    "The Copper Kettle",
    "Harbour Lights",
    "The Red Lion",
    "Saffron Brasserie",
    "The Lemon Tree",
    "Moonrise Diner",
    "The Gilded Fork",
    "Riverside Grill",
    "The Salt Cellar",
    "Little Havana",
]
EAT_TYPES = ["restaurant", "pub", "coffee shop"]
FOODS = ["Italian", "French", "Chinese", "Indian", "Japanese", "English", "fast food"]
PRICES = ["cheap", "moderately priced", "expensive"]
AREAS = ["riverside", "city centre"]
NEAR = [
    "Burger King",
    "Café Rouge",
    "The Sorrento",
    "Raja Indian Cuisine",
    "Crowne Plaza Hotel",
    "All Bar One",
    "Express by Holiday Inn",
    "Rainbow Vegetarian Café",
]


def _mr(rng: random.Random, name: str) -> dict[str, str]:
    mr = {"name": name, "eatType": rng.choice(EAT_TYPES)}
    for attr, values, p in (
        ("food", FOODS, 0.8),
        ("priceRange", PRICES, 0.6),
        ("area", AREAS, 0.6),
        ("familyFriendly", ["yes", "no"], 0.5),
        ("near", NEAR, 0.4),
    ):
        if rng.random() < p:
            mr[attr] = rng.choice(values)
    return mr


def _sentence(rng: random.Random, mr: dict[str, str]) -> str:
    name, eat = mr["name"], mr["eatType"]
    food = mr.get("food")
    price = mr.get("priceRange")
    first = rng.choice(
        [
            f"{name} is a{'n' if (price or food or eat)[0] in 'aeiouAEIOU' else ''} {price + ' ' if price else ''}"
            f"{food + ' ' if food else ''}{eat}",
            f"{name} is a {eat}{' serving ' + food + ' food' if food else ''}"
            f"{' in the ' + price + ' price range' if price else ''}",
        ]
    )
    parts = [first]
    if "area" in mr:
        parts.append(rng.choice([f"in the {mr['area']} area", f"located in the {mr['area']}"]))
    if "near" in mr:
        parts.append(rng.choice([f"near {mr['near']}", f"close to {mr['near']}"]))
    sentence = " ".join(parts) + "."
    if "familyFriendly" in mr:
        sentence += (
            rng.choice([" It is family friendly.", " Children are welcome."])
            if mr["familyFriendly"] == "yes"
            else rng.choice([" It is not family friendly.", " It is not suitable for children."])
        )
    return sentence


def format_mr(mr: dict[str, str]) -> str:
    return " | ".join(f"{k}[{v}]" for k, v in mr.items())


def restaurants(n: int = 800, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows of ``{"prompt": MR, "completion": sentence, "group": MR}``; about two references per MR."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        mr = _mr(rng, rng.choice(NAMES))
        text = format_mr(mr)
        for _ in range(rng.choice([1, 2, 3])):
            rows.append({"prompt": text, "completion": _sentence(rng, mr), "group": text})
    return rows[:n]


POSITIVE = [
    "a delight from start to finish",
    "warm, funny and beautifully acted",
    "the best film I have seen this year",
    "sharp writing and a great cast",
    "moving and honest",
    "works perfectly, I love it",
    "a real pleasure",
    "clever, fresh and full of heart",
    "stunning visuals and a gripping story",
    "worth every penny",
]
NEGATIVE = [
    "a tedious mess",
    "flat characters and a predictable plot",
    "the worst purchase I have made",
    "broke after two days",
    "dull, slow and far too long",
    "a waste of time",
    "badly written and badly acted",
    "nothing works as advertised",
    "boring from the first minute",
    "I regret buying it",
]
OPENERS = ["", "Honestly, ", "In short: ", "Overall ", "I think it is ", "This one is "]


def sentiment(n: int = 600, seed: int = 0) -> list[dict]:
    """``n`` rows of ``{"sentence": str, "label": 0|1}``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        phrase = rng.choice(POSITIVE if label else NEGATIVE)
        rows.append({"sentence": f"{rng.choice(OPENERS)}{phrase}.", "label": label})
    return rows


BUILTIN = {"restaurants": restaurants, "sentiment": sentiment}
