"""Build the small instruction set of data/sft from the shipped text samples in data/pt.

Every answer (and every passage in a prompt) is real text cut from data/pt; only the instructions are
written here, in English and Chinese (no Tibetan is written by hand). Tasks: "give the next sentence" and
"continue this passage", for Tibetan, English and Chinese text, in the Alpaca form (alpaca.json, a JSON
array) and the chat form (chat.jsonl, multi-turn conversations, some with a system message).

Run from the repository root: python data/sft/make_sft_data.py  (deterministic: same input, same output)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "data" / "sft"

# Sentence ends: Tibetan shad followed by a space; Latin .!? before a capital or a quote (not after Mr. and
# the like); Chinese full stops.
SPLITTERS = {
    "bo": re.compile(r"(?<=།)\s+"),
    "en": re.compile(r"(?<!Mr\.)(?<!Mrs\.)(?<!Dr\.)(?<!St\.)(?<=[.!?])\s+(?=[A-Z\"“])"),
    "zh": re.compile(r"(?<=[。！？．])"),
}
# (shortest, longest) sentence in characters; short fragments are joined to the next one.
LENGTHS = {"bo": (30, 160), "en": (30, 200), "zh": (12, 90)}
SOURCES = {
    "bo": ["bo/nanhai_modern_deseg.txt", "bo/mila.txt", "bo/kangyur_vol001.txt"],
    "en": ["en/austen_pride_and_prejudice.txt"],
    "zh": ["zh/hongloumeng_ch001-080.txt"],
}
NEXT = {
    "bo": ["Give the sentence that comes next in this Tibetan text.", "给出这段藏文的下一句。"],
    "en": ["Give the sentence that comes next in this text."],
    "zh": ["给出这段文字的下一句。"],
}
CONTINUE = {
    "bo": ["Continue this Tibetan passage.", "续写这段藏文。"],
    "en": ["Continue this passage."],
    "zh": ["续写这段文字。"],
}
MORE = {"bo": ["Go on.", "继续。"], "en": ["Go on."], "zh": ["继续。"]}
SYSTEM = "You continue texts faithfully, in the language and style of the text."
PER_LANGUAGE_ALPACA = 40
PER_LANGUAGE_CHAT = 20


def runs_of_sentences(lang: str) -> list[list[str]]:
    """Runs of consecutive sentences (each within the length bounds) from the language's documents."""
    lo, hi = LENGTHS[lang]
    runs = []
    for name in SOURCES[lang]:
        text = (ROOT / "data" / "pt" / name).read_text(encoding="utf-8")
        # English lines are wrapped prose: paragraphs are separated by blank lines.
        docs = re.split(r"\n\s*\n", text) if lang == "en" else text.splitlines()
        for doc in docs:
            doc = " ".join(doc.split())
            run, pending = [], ""
            for piece in SPLITTERS[lang].split(doc):
                pending = f"{pending} {piece}".strip() if lang != "zh" else pending + piece.strip()
                if len(pending) < lo:
                    continue
                if len(pending) <= hi and not pending.lower().startswith("chapter"):
                    run.append(pending)
                elif len(run) >= 2:
                    runs.append(run)
                    run = []
                else:
                    run = []
                pending = ""
            if len(run) >= 2:
                runs.append(run)
    return runs


def take(rng: random.Random, runs: list[list[str]], n: int) -> list[str]:
    """``n`` consecutive sentences from a random run that has them (runs are consumed: no text repeats)."""
    candidates = [r for r in runs if len(r) >= n]
    run = rng.choice(candidates)
    start = rng.randrange(len(run) - n + 1)
    picked = run[start : start + n]
    runs.remove(run)
    runs += [part for part in (run[:start], run[start + n :]) if len(part) >= 2]
    return picked


def main() -> None:
    rng = random.Random(0)
    alpaca, chats = [], []
    for lang in ("bo", "en", "zh"):
        runs = runs_of_sentences(lang)
        for i in range(PER_LANGUAGE_ALPACA):
            if i % 2 == 0:
                first, second = take(rng, runs, 2)
                alpaca.append({"instruction": rng.choice(NEXT[lang]), "input": first, "output": second})
            else:
                sentences = take(rng, runs, 3)
                alpaca.append(
                    {
                        "instruction": rng.choice(CONTINUE[lang]),
                        "input": " ".join(sentences[:2]),
                        "output": sentences[2],
                    }
                )
        for i in range(PER_LANGUAGE_CHAT):
            turns = 2 + i % 2
            sentences = take(rng, runs, turns + 1)
            messages = [{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []
            messages.append({"role": "user", "content": f"{rng.choice(CONTINUE[lang])}\n\n{sentences[0]}"})
            messages.append({"role": "assistant", "content": sentences[1]})
            for sentence in sentences[2:]:
                messages.append({"role": "user", "content": rng.choice(MORE[lang])})
                messages.append({"role": "assistant", "content": sentence})
            chats.append({"messages": messages})
    (OUT / "alpaca.json").write_text(
        json.dumps(alpaca, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    (OUT / "chat.jsonl").write_text(
        "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats), encoding="utf-8"
    )
    print(f"wrote {len(alpaca)} Alpaca records and {len(chats)} conversations to {OUT}")


if __name__ == "__main__":
    main()
