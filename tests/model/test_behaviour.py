"""Behaviour of a trained model, on the path a served message takes (raw text → curate.clean_text → the
string-input model), in the manner of CheckList (Ribeiro et al., 2020):

- invariance: a message and its upper-cased, lower-cased, swapped-case and extra-whitespace variants get the
  same spam probability (within 1e-6), since clean_text lowercases and collapses whitespace (also inside a phone
  number or an amount, before its token rules);
- direction: adding a URL, a phone number or a money prize to a ham message does not lower its spam
  probability on average over the test split's ham messages.

One small LSTM is trained per module on the corpus lake (3 epochs). Each check is also run on a deliberately
broken scorer (no clean_text; probabilities reversed), which it must catch: the checks can fail."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.model

CONFIG = {"epochs": 3, "patience": 3, "lstm_units": 32}  # over DEFAULT_CONFIG: minutes would buy nothing here
TOLERANCE = 1e-6
VARIANTS = {
    "upper": str.upper,
    "lower": str.lower,
    "swapcase": str.swapcase,
    "padding": lambda t: " \t " + t + " \n ",
    "spaces": lambda t: re.sub(" ", " \t  ", t),
}
PERTURBATIONS = {
    "url": lambda t: f"{t} http://www.claim-now.example/win",
    "phone": lambda t: f"{t} 09061701461",
    "money": lambda t: f"{t} £1000 prize",
}


@pytest.fixture(scope="module")
def trained(pipeline_lake):
    "The served (string-input) model trained on the lake's train split, and the test split with the raw texts."
    from spam_mlops.curate import read_curated
    from spam_mlops.lake import Lake
    from spam_mlops.model import DEFAULT_CONFIG, export_model, fit_model, prepare_data
    from spam_mlops.train import split_frame, training_frame
    c = DEFAULT_CONFIG | CONFIG
    parts = split_frame(training_frame(pipeline_lake, source="lake"))
    data = prepare_data(parts, c)
    net, _ = fit_model(c, data)
    raw = read_curated(Lake.from_settings(pipeline_lake))[["message_id", "text"]]
    return export_model(data["vocabulary"], net, c["max_len"]), parts["test"].merge(raw, on="message_id")


def served(model, texts: list[str]) -> np.ndarray:
    "Spam probabilities of raw messages as serving computes them: clean_text, then the model."
    from spam_mlops.curate import clean_text
    from spam_mlops.model import predict_texts
    return predict_texts(model, clean_text(pd.Series(texts, dtype="string")).astype(str))


@pytest.fixture(scope="module")
def score(trained):
    return lambda texts: served(trained[0], texts)


@pytest.fixture(scope="module")
def ham(trained) -> list[str]:
    "The test split's ham messages, raw (as a client sends them)."
    test = trained[1]
    return test[test.y == 0].text.astype(str).tolist()


def invariance_gap(score, texts: list[str], variant) -> float:
    "Largest change of the spam probability between a message and its variant."
    return float(np.abs(score([variant(t) for t in texts]) - score(texts)).max())


def direction_shift(score, texts: list[str], perturb) -> float:
    "Mean change of the spam probability when `perturb` is applied to each message."
    return float(np.mean(score([perturb(t) for t in texts]) - score(texts)))


def test_the_model_learned_something(score, trained, ham):
    "Sanity first: the behaviour checks mean little on a model that cannot tell spam from ham."
    test = trained[1]
    p = score(test.text.astype(str).tolist())
    assert ((p > 0.5) == (test.y == 1)).mean() > 0.9
    assert len(ham) > 300


@pytest.mark.parametrize("variant", VARIANTS)
def test_invariant_to_case_and_whitespace(score, trained, variant):
    texts = trained[1].text.astype(str).tolist()  # ham and spam
    assert invariance_gap(score, texts, VARIANTS[variant]) < TOLERANCE


@pytest.mark.parametrize("token", PERTURBATIONS)
def test_spam_tokens_do_not_lower_the_spam_probability(score, ham, token):
    shift = direction_shift(score, ham, PERTURBATIONS[token])
    assert shift >= 0, f"adding a {token} lowers a ham message's spam probability by {-shift:.4f} on average"
    lowered = np.mean(score([PERTURBATIONS[token](t) for t in ham]) < score(ham) - 0.01)
    assert lowered < 0.05, f"adding a {token} lowers the spam probability of {lowered:.1%} of ham messages"


def test_the_checks_catch_a_broken_model(trained, ham):
    "Without clean_text the model sees other tokens for other case; with reversed output, spam tokens lower it."
    from spam_mlops.model import predict_texts
    model = trained[0]
    raw = lambda texts: predict_texts(model, texts)  # noqa: E731  skips clean_text
    assert invariance_gap(raw, ham, VARIANTS["upper"]) > 100 * TOLERANCE
    reversed_ = lambda texts: 1 - served(model, texts)  # noqa: E731
    assert all(direction_shift(reversed_, ham, p) < 0 for p in PERTURBATIONS.values())
