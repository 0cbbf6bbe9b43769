"""Build data/train.jsonl and data/validation.jsonl from the raw public-domain corpus.

A one-off tool: the JSONL files it writes are committed, so users never need the raw corpus.

    python data/prepare.py [--corpus ../shared/corpus] [--out data]

Output rows are {"text": ..., "source": ...}, one document per row. The held-out validation part
is fixed here (see VALIDATION_ADDRESSES and SHAKESPEARE_VALIDATION_LINES) and documented in
data/README.md. Running it twice gives byte-identical files.
"""

import argparse
import json
from pathlib import Path

# Whole addresses held out for validation: one per decade-ish, four presidents, ~4.5% of the text.
VALIDATION_ADDRESSES = ("1951-Truman", "1969-Johnson", "1987-Reagan", "2005-GWBush")
# The last 2,000 of the 40,000 Shakespeare lines are held out (5%).
SHAKESPEARE_VALIDATION_LINES = 2000
# Consecutive speeches are grouped into documents of at least this many lines (~3 KB each), so
# the play text is several hundred documents rather than one giant one.
SHAKESPEARE_DOC_LINES = 100


# Five Nixon addresses (1970-1974) carry Big5 double-byte punctuation in otherwise ASCII text
# (a known blemish of the NLTK copy); read as Latin-1 they would become mojibake.
BIG5_PUNCTUATION = {b"\xa1\xa6": b"'", b"\xa1\xa7": b'"', b"\xa1\xa8": b'"', b"\xa1X": b"--",
                    b"\xa1K": b"...", b"\xa1@": b""}


def read_text(path: Path) -> str:
    """UTF-8 when valid, else Latin-1 (a few addresses are ISO-8859-1); clean line ends."""
    raw = path.read_bytes()
    for big5, ascii_text in BIG5_PUNCTUATION.items():
        raw = raw.replace(big5, ascii_text)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip() + "\n"


def state_union_docs(folder: Path) -> list[dict]:
    return [{"text": read_text(path), "source": f"state_union/{path.name}"}
            for path in sorted(folder.glob("*.txt"))]


def shakespeare_docs(path: Path) -> tuple[list[dict], list[dict]]:
    """Split into documents at speech boundaries (blank lines); the last lines are validation."""
    lines = read_text(path).rstrip("\n").split("\n")
    cut = len(lines) - SHAKESPEARE_VALIDATION_LINES
    # Move the cut back to the blank line before it, so no speech is split between the parts.
    while lines[cut - 1] != "":
        cut -= 1

    def chunk(first: int, last: int) -> list[dict]:
        docs, start = [], first
        for i in range(first, last + 1):
            at_speech_end = i == last or lines[i] == ""
            if at_speech_end and (i - start >= SHAKESPEARE_DOC_LINES or i == last):
                text = "\n".join(lines[start:i]).strip("\n") + "\n"
                docs.append({"text": text,
                             "source": f"{path.name} lines {start + 1}-{i}"})
                start = i + 1
        if len(docs) > 1 and docs[-1]["text"].count("\n") < SHAKESPEARE_DOC_LINES // 2:
            tail = docs.pop()  # too short to stand alone: merge into the previous document
            first_line = docs[-1]["source"].split()[-1].split("-")[0]
            docs[-1] = {"text": docs[-1]["text"] + "\n" + tail["text"],
                        "source": f"{path.name} lines {first_line}-{last}"}
        return docs

    return chunk(0, cut - 1), chunk(cut, len(lines))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=here.parent.parent / "shared" / "corpus")
    parser.add_argument("--out", type=Path, default=here)
    args = parser.parse_args()

    addresses = state_union_docs(args.corpus / "state_union")
    held_out = {f"state_union/{name}.txt" for name in VALIDATION_ADDRESSES}
    missing = held_out - {doc["source"] for doc in addresses}
    if missing:
        raise SystemExit(f"error: validation addresses not found: {sorted(missing)}")
    play_train, play_validation = shakespeare_docs(args.corpus / "tinyshakespeare.txt")

    train = [d for d in addresses if d["source"] not in held_out] + play_train
    validation = [d for d in addresses if d["source"] in held_out] + play_validation
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "validation.jsonl", validation)
    for name, rows in (("train", train), ("validation", validation)):
        chars = sum(len(r["text"]) for r in rows)
        print(f"{name}: {len(rows)} documents, {chars:,} characters")


if __name__ == "__main__":
    main()
