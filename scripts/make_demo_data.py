"""Generate the embedded demo preference data: data/demo/{train,val}.jsonl.

The rule a tiny model must learn from DPO:
  * prompt   = a question about one subject (a colour, animal, city, number,
    fruit or instrument), asked with one of several question templates and
    rendered in the tiny tokenizer's chat format
    ``<|user|>\\n{question}\\n<|assistant|>\\n``.
  * chosen   = a polite, on-topic answer: a friendly opener, a sentence that
    names the subject and its kind, a friendly closer.
  * rejected = a curt or rude, off-topic answer: a dismissive opener, a
    sentence that refuses, wanders to another subject or insults the question,
    a dismissive closer.
Openers, bodies and closers are drawn from disjoint polite / rude word sets,
with several templates each, and both answers have similar lengths (length
alone does not decide). Validation prompts are (subject, question) combinations
that never occur in the training file. Everything is drawn from
``random.Random(SEED)``, so the files are identical on every run.

Usage: python scripts/make_demo_data.py [--out data/demo]
"""

import argparse
import json
import random
from pathlib import Path

SEED = 1234
NUM_TRAIN = 600
NUM_VAL = 64

SUBJECTS = {
    "colour": ["red", "blue", "green", "yellow", "orange", "purple", "pink",
               "brown", "black", "white", "grey", "gold", "silver", "violet"],
    "animal": ["cat", "dog", "horse", "rabbit", "tiger", "lion", "eagle",
               "dolphin", "owl", "fox", "bear", "wolf", "sheep", "frog",
               "whale", "mouse"],
    "city": ["Paris", "London", "Tokyo", "Rome", "Cairo", "Sydney", "Berlin",
             "Madrid", "Lima", "Oslo", "Dublin", "Vienna", "Athens", "Seoul"],
    "number": ["three", "five", "seven", "eight", "nine", "ten", "twelve",
               "twenty", "forty", "hundred"],
    "fruit": ["apple", "banana", "cherry", "mango", "pear", "grape", "lemon",
              "peach", "plum", "melon"],
    "instrument": ["guitar", "piano", "violin", "drum", "flute", "trumpet",
                   "harp", "cello"],
}

QUESTIONS = [
    "What can you tell me about {s}?",
    "Could you describe {s} for me?",
    "Why do people like {s}?",
    "Tell me something about {s}.",
    "What do you think of {s}?",
    "Is {s} interesting?",
    "Please explain {s} to me.",
    "I am curious about {s}. Any thoughts?",
    "What kind of {k} is {s}?",
    "Can you say a few words about {s}?",
]

POLITE_OPENERS = ["Happy to help!", "Great question!", "Sure, gladly.",
                  "Thanks for asking!", "Of course!", "With pleasure."]
POLITE_BODIES = [
    "{S} is a lovely {k} that many people enjoy.",
    "{S} is a well known {k} with a lot of charm.",
    "People often admire {s}, {a_k} worth learning about.",
    "{S} is a wonderful {k}, and there is much to say about it.",
    "As {a_k}, {s} is friendly, bright and easy to like.",
]
POLITE_CLOSERS = ["I hope this helps.", "Feel free to ask more.",
                  "Have a nice day.", "Kind regards."]

RUDE_OPENERS = ["Ugh, really?", "Whatever, fine.", "No, not this.",
                "Go away now.", "How boring.", "Not again."]
RUDE_BODIES = [
    "I refuse to talk about that, ask someone else.",
    "Only {o} matters to me, so stop asking about this.",
    "That is a silly thing to ask and I will not answer.",
    "Stop bothering me with such dull and pointless questions.",
    "I do not care about it at all, talk about {o} instead.",
]
RUDE_CLOSERS = ["Just leave me alone.", "Figure it out yourself.",
                "I am done here.", "Do not ask again."]


def chat_prompt(question: str) -> str:
    """The tiny tokenizer's chat template, rendered for one user turn."""
    return f"<|user|>\n{question}\n<|assistant|>\n"


def make_pair(rng: random.Random, subject: str, kind: str, question: str,
              others: list[str]) -> dict:
    article = "an" if kind[0] in "aeiou" else "a"
    fill = {"s": subject, "S": subject[0].upper() + subject[1:], "k": kind,
            "a_k": f"{article} {kind}",
            "o": rng.choice([o for o in others if o != subject])}
    chosen = " ".join([rng.choice(POLITE_OPENERS),
                       rng.choice(POLITE_BODIES).format(**fill),
                       rng.choice(POLITE_CLOSERS)])
    rejected = " ".join([rng.choice(RUDE_OPENERS),
                         rng.choice(RUDE_BODIES).format(**fill),
                         rng.choice(RUDE_CLOSERS)])
    return {"prompt": chat_prompt(question.format(**fill)),
            "chosen": chosen, "rejected": rejected}


def make_splits(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, val) pairs; val prompts never appear in train."""
    rng = random.Random(seed)
    all_subjects = [s for names in SUBJECTS.values() for s in names]
    combos = [(s, k, q) for k, names in SUBJECTS.items() for s in names
              for q in QUESTIONS]
    rng.shuffle(combos)
    val_combos = combos[:NUM_VAL]
    train_combos = combos[NUM_VAL:NUM_VAL + NUM_TRAIN]
    assert len(train_combos) == NUM_TRAIN, "add subjects or questions"
    val = [make_pair(rng, s, k, q, all_subjects) for s, k, q in val_combos]
    train = [make_pair(rng, s, k, q, all_subjects) for s, k, q in train_combos]
    return train, val


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo")
    args = parser.parse_args()
    train, val = make_splits()
    write_jsonl(Path(args.out) / "train.jsonl", train)
    write_jsonl(Path(args.out) / "val.jsonl", val)
    print(f"wrote {len(train)} train and {len(val)} val pairs to {args.out}")


if __name__ == "__main__":
    main()
