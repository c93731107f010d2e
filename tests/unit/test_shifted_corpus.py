"""bench/shifted_corpus.py, the shifted stream of the continuous-training benchmark, on hand-written messages (no
download): what a snippet keeps and drops, deduplication and label conflicts, the stable labelled/held-out split."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import shifted_corpus as sc  # noqa: E402

PLAIN = """From someone@example.com  Thu Aug 22 13:17:22 2002
Return-Path: <someone@example.com>
Subject: Re: dinner
Content-Type: text/plain; charset="us-ascii"

On Thu, Aug 22, 2002 at 10:00, Bob wrote:
> are we still on for tonight?
> it is late
Yes, I booked the table for eight. See you at the restaurant near the station.
--
Alice, who signs every mail
"""

HTML = """From spam@example.com  Thu Aug 22 13:17:22 2002
Subject: FREE
MIME-Version: 1.0
Content-Type: text/html; charset="iso-8859-1"
Content-Transfer-Encoding: quoted-printable

<HTML><HEAD><STYLE>p {color: red}</STYLE></HEAD><BODY><P>You have been selected to receive a FREE =
vacation&nbsp;package! Click <A HREF=3D"http://win.example.com">here</A> now.</P></BODY></HTML>
"""


def test_snippet_drops_headers_quotes_and_signature():
    s = sc.snippet(PLAIN)
    assert s == "Yes, I booked the table for eight. See you at the restaurant near the station."


def test_snippet_of_html_keeps_the_text_only():
    s = sc.snippet(HTML)
    assert s.startswith("You have been selected to receive a FREE vacation package!")
    assert "<" not in s and "color" not in s and "=3D" not in s


def test_snippet_length_bounds():
    long = PLAIN.replace("Yes, I booked the table for eight.", "word " * 200)
    assert len(sc.snippet(long)) <= sc.MAX_CHARS
    assert sc.snippet(PLAIN.replace("Yes, I booked the table for eight. See you at the restaurant near the station.",
                                    "Ok.")) is None  # under MIN_CHARS: no snippet


def test_build_dedupes_and_drops_conflicting_texts():
    msgs = pd.DataFrame({"group": ["easy-ham-1", "easy-ham-2", "spam-1", "spam-2", "easy-ham-1"],
                         "label": ["ham", "ham", "spam", "spam", "ham"],
                         "file": list("abcde"),
                         "message": [PLAIN, PLAIN.replace("eight", "EIGHT").replace("Yes", "yes"), HTML,
                                     PLAIN.replace("Yes, I booked", "Yes, we booked"),
                                     PLAIN.replace("Yes, I booked", "Yes, we booked")]})
    df, counts = sc.build(msgs)
    assert counts["duplicates"] == 1 and counts["conflicting"] == 2  # same text up to case; one text, two labels
    assert sorted(df.label) == ["ham", "spam"] and df.message_id.is_unique
    assert set(df.split) <= {"labelled", "held_out"}


def test_split_is_stable_and_near_the_share():
    ids = [sc.message_id(f"message {i}") for i in range(5000)]
    first = [sc.split_of(i) for i in ids]
    assert first == [sc.split_of(i) for i in ids]
    share = first.count("labelled") / len(first)
    assert abs(share - sc.LABELLED_SHARE) < 0.02
