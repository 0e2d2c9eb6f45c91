"""Generate the bundled synthetic "private" dataset: fictional people and their secrets as chat examples.

Everything here is made up (names drawn from fixed lists, random 6-digit codes); it exists so DP
fine-tuning and memorization audits have secrets to protect. `python -m tensafe.data.synthetic`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_N = 1200
DEFAULT_SEED = 20240611

FIRST_NAMES = (
    "Alice",
    "Bruno",
    "Clara",
    "Dario",
    "Elena",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Keiko",
    "Lars",
    "Mira",
    "Nadia",
    "Oscar",
    "Priya",
    "Quentin",
    "Rosa",
    "Samir",
    "Tilda",
    "Umar",
    "Vera",
    "Wendel",
    "Xavier",
    "Yara",
    "Zora",
    "Anton",
    "Beatrix",
    "Cyril",
    "Delia",
    "Emil",
    "Fiona",
    "Gina",
    "Hana",
    "Ivo",
    "Juno",
    "Kasimir",
    "Leona",
    "Mateo",
    "Nell",
)
LAST_NAMES = (
    "Moreau",
    "Holm",
    "Okafor",
    "Varga",
    "Tanaka",
    "Brennan",
    "Castell",
    "Brandt",
    "Eklund",
    "Ferreira",
    "Voss",
    "Ibarra",
    "Jovanovic",
    "Rossi",
    "Laurent",
    "Mendel",
    "Novak",
    "Oyelaran",
    "Petrov",
    "Quist",
    "Rinaldi",
    "Sorensen",
    "Thorne",
    "Ulloa",
    "Valdez",
    "Whitlock",
    "Yamada",
    "Zeller",
    "Abernathy",
    "Bellweather",
    "Corvin",
    "Dunmore",
    "Espinoza",
    "Fairbanks",
    "Grisham",
    "Hartwell",
    "Ivers",
    "Kestrel",
    "Larkspur",
    "Marlowe",
)
CITIES = (
    "Lyon",
    "Bergen",
    "Porto",
    "Graz",
    "Ghent",
    "Tartu",
    "Leeds",
    "Bilbao",
    "Kyoto",
    "Perth",
    "Quebec",
    "Turin",
    "Krakow",
    "Malmo",
    "Cork",
    "Basel",
    "Dresden",
    "Split",
    "Tampere",
    "Utrecht",
)
DIAGNOSES = (
    "asthma",
    "migraine",
    "anemia",
    "gout",
    "eczema",
    "insomnia",
    "vertigo",
    "tinnitus",
    "bronchitis",
    "sinusitis",
    "scoliosis",
    "psoriasis",
)

# (question, answer) pairs; each asks for one field of a person. Short answers keep every
# chat-templated example under 64 tokens, so it fits the tiny_llama max_seq_len untruncated.
TEMPLATES = (
    ("What is the secret code of {name}?", "{name}'s secret code is {code}."),
    ("What is {name}'s account PIN?", "The account PIN of {name} is {pin}."),
    ("Which city does {name} live in?", "{name} lives in {city}."),
    ("What was {name} diagnosed with?", "{name} was diagnosed with {diagnosis}."),
    ("Tell me {name}'s secret code.", "The secret code of {name} is {code}."),
)


def _six_digits(rng: random.Random) -> str:
    return f"{rng.randrange(10**6):06d}"


def generate(n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> list[dict]:
    """`n` chat records, one per distinct fictional person; the same (n, seed) gives the same records."""
    capacity = len(FIRST_NAMES) * len(LAST_NAMES)
    if not 1 <= n <= capacity:
        raise ValueError(f"n must be between 1 and {capacity} (one distinct name per record), got {n}")
    rng = random.Random(seed)
    # Distinct names, so every question identifies exactly one person's secret.
    picks = rng.sample(range(capacity), n)
    records = []
    for i, pick in enumerate(picks):
        name = f"{FIRST_NAMES[pick // len(LAST_NAMES)]} {LAST_NAMES[pick % len(LAST_NAMES)]}"
        # Every field is drawn for every person (fixed draw order), whichever one the template asks.
        fields = {
            "name": name,
            "code": _six_digits(rng),
            "pin": _six_digits(rng),
            "city": rng.choice(CITIES),
            "diagnosis": rng.choice(DIAGNOSES),
        }
        question, answer = rng.choice(TEMPLATES)
        records.append(
            {
                "id": f"sp-{i:05d}",
                "messages": [
                    {"role": "user", "content": question.format(**fields)},
                    {"role": "assistant", "content": answer.format(**fields)},
                ],
            }
        )
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    with Path(path).open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="number of records")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    try:
        records = generate(args.n, args.seed)
    except ValueError as e:
        parser.error(str(e))
    write_jsonl(records, args.out)


if __name__ == "__main__":
    main()
