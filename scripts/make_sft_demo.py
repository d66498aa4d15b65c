"""Build a small supervised fine-tuning set from the embedded corpus: who speaks this line?

Each example shows a short passage of a play, three consecutive speeches by three different
speakers, each as the first words of the speech and its speaker (``"Who's there?" said BERNARDO.``),
and asks who says one of its lines; the answer is the speaker's name as the play prints it. There is
no system message, so the model's template adds its default one, as ``jaxlm generate --chat`` does::

    {"messages": [{"role": "user", "content": "\\"There, sir, stop:\\" said PROSPERO.\\n\\"I have inly wept,\\" said GONZALO.\\n\\"I say, Amen, Gonzalo!\\" said ALONSO.\\n\\nWho says \\"I say, Amen, Gonzalo!\\"?"},
                  {"role": "assistant", "content": "ALONSO"}]}

Because the three speakers differ and the quoted line is drawn uniformly, answering with a name of
the passage chosen by any rule that ignores the quote (the first, a random one) scores 1/3: that is
the chance level the held-out accuracy is compared with (printed as ``chance``).

The plays are split by play, not by example: the held-out file comes from plays the training file
never shows (``--heldout-plays``), so held-out accuracy measures the skill, not memory.

    python scripts/make_sft_demo.py --out runs/sft-demo     # writes train.jsonl and heldout.jsonl
    python scripts/make_sft_demo.py --out runs/sft-demo --print-questions 3 | xargs -0 ...   # questions to ask
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import re

from jaxlm.data import load_text

SPEAKER = re.compile(r"^([A-Z][A-Z .'-]+):$")  # a speech starts with its speaker's name alone on a line


def speeches(text: str) -> list[tuple[str, str, str]]:
    """``(play, speaker, first line)`` of every speech of the corpus, in order."""
    out, play, speaker = [], "", None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if i + 2 < len(lines) and lines[i + 2] == "ACT I":  # a play's title, then a blank line, then ACT I
            play = line.strip()
        m = SPEAKER.match(line.strip())
        if m:
            speaker = m.group(1)
        elif speaker and line.strip() and not line.startswith("["):
            out.append((play, speaker, line.strip()))
            speaker = None  # the first line of the speech only
    return out


def examples(items: list[tuple[str, str, str]], rng: random.Random, window: int, max_words: int) -> list[dict]:
    """One conversation per passage of ``window`` consecutive speeches of one play by ``window`` different speakers."""
    out = []
    for i in range(0, len(items) - window, window):
        passage = items[i : i + window]
        if len({p for p, _, _ in passage}) > 1 or len({s for _, s, _ in passage}) < window:
            continue
        lines = [(s, " ".join(t.split()[:max_words])) for _, s, t in passage]
        if len({t for _, t in lines}) < window:
            continue  # a repeated line would have two answers
        speaker, quote = lines[rng.randrange(window)]
        prompt = "\n".join(f'"{t}" said {s}.' for s, t in lines) + f'\n\nWho says "{quote}"?'
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": speaker}]})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory to write train.jsonl and heldout.jsonl into")
    ap.add_argument("--heldout-plays", default="TWELFTH NIGHT,THE TEMPEST", help="comma-separated play titles held out")
    ap.add_argument("--train", type=int, default=1200, help="training conversations (at most)")
    ap.add_argument("--heldout", type=int, default=64, help="held-out conversations (at most)")
    ap.add_argument("--window", type=int, default=3, help="speeches per passage")
    ap.add_argument("--max-words", type=int, default=10, help="words kept of each speech's first line")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-questions", dest="print_questions", type=int, default=0,
                    help="only print the first N held-out questions of --out, NUL-separated (for xargs -0)")
    args = ap.parse_args(argv)
    if args.print_questions:
        rows = (pathlib.Path(args.out) / "heldout.jsonl").read_text().splitlines()[: args.print_questions]
        print("\0".join(json.loads(r)["messages"][0]["content"] for r in rows), end="")
        return
    rng = random.Random(args.seed)
    held = {p.strip() for p in args.heldout_plays.split(",")}
    items = speeches(load_text())
    plays = sorted({p for p, _, _ in items})
    if not held <= set(plays):
        raise SystemExit(f"--heldout-plays: unknown play(s) {sorted(held - set(plays))}; the corpus has {plays}")
    train = examples([x for x in items if x[0] not in held], rng, args.window, args.max_words)
    heldout = examples([x for x in items if x[0] in held], rng, args.window, args.max_words)
    rng.shuffle(train)
    rng.shuffle(heldout)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train[: args.train]), ("heldout", heldout[: args.heldout])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}.jsonl: {len(rows)} conversations")
    print(f"chance (a name of the passage, ignoring the quote): {1 / args.window:.1%}")


if __name__ == "__main__":
    main()
