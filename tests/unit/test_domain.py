"""Unit tests of spam_mlops.domain (the classifier two-sample test) and of its group in spam_mlops.drift's decision,
on SMS-like messages from templates, a parcel-fee campaign and a tiny LSTM: cheap, no servers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spam_mlops import domain as dm
from spam_mlops import drift as dr
from spam_mlops.config import DriftSettings, get_settings
from spam_mlops.curate import clean_text
from spam_mlops.demo import build_demo_model, campaign, sms_like
from spam_mlops.features import FEATURE_TYPES, compute_features
from spam_mlops.profile import profile_from_parts

# the campaign's words, and its cleaned placeholders: fees (xmoney), sites (xurl), parcel refs ending in GB
CAMPAIGN_TOKENS = {"parcel", "fee", "customs", "code", "verification", "delivery", "pay", "depot", "toll", "your",
                   "xmoney", "xurl", "gb"}


def _log(texts) -> pd.DataFrame:
    "Prediction-log-like rows: text, features and a spam probability."
    texts = pd.Series(list(texts), dtype=object)
    out = pd.concat([pd.DataFrame({"text": texts}), compute_features(texts)], axis=1)
    return out.assign(spam_probability=0.1, prediction="ham")


def _campaign(n: int, seed: int = 0) -> list[str]:
    return [line.split("\t", 1)[1] for line in campaign(n, seed=seed).decode().splitlines()]


@pytest.fixture(scope="module")
def profile():
    "A baseline profile whose reference sample holds 600 held-out SMS-like messages."
    def part(df):
        out = pd.concat([df.reset_index(drop=True), compute_features(df.text).reset_index(drop=True)], axis=1)
        return out.assign(clean_text=clean_text(out.text.astype(object)).astype(str))
    parts = {"train": part(sms_like(1500, seed=1)), "val": part(sms_like(600, seed=2))}
    vocab = sorted({t for s in parts["train"].clean_text for t in s.split()})
    return profile_from_parts(parts, vocab, lambda c: np.full(len(c), 0.1))


@pytest.fixture(scope="module")
def model():
    demo = sms_like(1500, seed=1)
    return build_demo_model(demo.text, (demo.label == "spam").astype(int), epochs=1)


def test_profile_holds_a_reference_sample(profile):
    ref = profile["reference"]
    assert ref["n"] == 600 == len(ref["clean_text"]) and set(ref["features"]) == set(FEATURE_TYPES)


@pytest.mark.parametrize("seed", [3, 5])
def test_a_clean_window_is_not_flagged(profile, model, seed):
    r = dm.domain_test(_log(sms_like(500, seed=seed).text), profile, model)
    assert r["p_value"] > 0.01 and r["representation"] == ["features", "model", "tokens"], r


def test_a_window_with_30_percent_campaign_is_flagged_and_named(profile, model):
    window = _log(sms_like(350, seed=4).text.tolist() + _campaign(150))
    r = dm.domain_test(window, profile, model)
    assert r["p_value"] < 1e-6 and r["auc"] > 0.6, r
    top = {t["token"] for t in r["tokens"]}
    assert len(top & CAMPAIGN_TOKENS) >= 4, r["tokens"]
    words = ("parcel", "code", "toll", "delivery", "dhl", "royal mail", "fee")
    assert sum(any(w in ex.lower() for w in words) for ex in r["examples"]) >= 4, r["examples"]


def test_without_text_the_features_still_test(profile):
    window = _log(sms_like(350, seed=4).text.tolist() + _campaign(150)).assign(text=None)
    r = dm.domain_test(window, profile)
    assert r["representation"] == ["features"] and r["tokens"] == [] and r["p_value"] < 0.01


def test_the_served_models_representation_is_found_through_nesting():
    from spam_mlops.model import build_model, export_model
    served = export_model(["win", "prize", "see", "you"], build_model(6, lstm_units=7, max_len=8), max_len=8)
    assert dm.embed(served, ["win a prize", "see you", ""]).shape == (3, 7)


def test_a_profile_without_reference_is_refused_and_skipped(profile):
    window = _log(sms_like(300, seed=6).text)
    with pytest.raises(dm.DomainError, match="no reference messages"): dm.domain_test(window, {})
    old = {k: v for k, v in profile.items() if k != "reference"}
    cfg = get_settings(DriftSettings)
    assert "domain" in dr.decide(dr.run_tests(window, old, cfg), cfg)["skipped_groups"]


def test_decide_has_the_domain_group_at_a_bonferroni_level(profile, model):
    cfg = get_settings(DriftSettings)
    quiet = dr.run_tests(_log(sms_like(500, seed=7).text), profile, cfg, model)
    loud = dr.run_tests(_log(sms_like(350, seed=8).text.tolist() + _campaign(150, seed=1)), profile, cfg, model)
    row = next(t for t in loud if t["group"] == "domain")
    assert row["threshold"] == pytest.approx(cfg.p_value / 4)  # feature, text, prediction, domain
    dq, dl = dr.decide(quiet, cfg), dr.decide(loud, cfg)
    assert not dq["groups"]["domain"] and dl["groups"]["domain"] and dl["drift_detected"]
    assert set(dl) >= {"drift_detected", "groups", "drifted_features", "drifted_feature_share", "skipped_groups"}
    page = dr.render_html({"id": "t", "status": "ok", "tests": loud, "decision": dl}, _log(["x"] * 3), profile)
    assert "Domain classifier" in page and "parcel" in page
    from prometheus_client import generate_latest
    text = generate_latest(dr.metrics_registry({"tests": loud, "decision": dl})).decode()
    assert "spam_drift_domain_auc" in text and "spam_drift_domain_p_value" in text and "spam_drift_domain_alpha" in text
