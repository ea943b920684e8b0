"""Issue 16: one metric registry (name -> direction, bounds, transform) that the archive, the predictors
and the search all ask. Before it, ``archdb.protocol`` and ``optimizer.predictors`` disagreed on
``loss`` and ``word_perplexity``, and lm-eval's ``task/metric`` names were not recognised at all."""

from __future__ import annotations

import pytest

from archopt.archdb.metrics import UnknownMetric, metric_info
from archopt.archdb.protocol import ProtocolError, lower_is_better, validate_value
from archopt.optimizer.predictors import metric_direction, metric_transform

LOWER = ["ppl_wikitext2", "ppl_ptb", "ppl_x", "kl_base", "kl_dense", "loss", "loss_val", "word_perplexity",
         "byte_perplexity", "bits_per_byte", "perplexity", "wikitext/word_perplexity", "wikitext/bits_per_byte",
         "lambada_openai/perplexity", "wikitext/word_perplexity,none"]
HIGHER = ["mmlu", "mmlu:anatomy", "hellaswag/acc_norm", "arc_easy/acc", "mmlu/acc", "gsm8k/exact_match"]


@pytest.mark.parametrize("name", LOWER + HIGHER)
def test_archive_and_predictors_agree_on_the_direction(name):
    info = metric_info(name)
    lower = name in LOWER
    assert info.higher_is_better is (not lower)
    assert lower_is_better(name) is lower
    assert metric_direction(name) == ("minimize" if lower else "maximize") == info.direction


@pytest.mark.parametrize("name, transform", [
    ("ppl_wikitext2", "log"), ("word_perplexity", "log"), ("wikitext/byte_perplexity", "log"),
    ("lambada_openai/perplexity", "log"), ("kl_base", "log_eps"), ("loss", "identity"),
    ("bits_per_byte", "identity"), ("mmlu", "identity"), ("hellaswag/acc", "identity")])
def test_one_transform_per_metric(name, transform):
    assert metric_info(name).transform == transform == metric_transform(name)


def test_bounds_come_from_the_registry():
    assert metric_info("mmlu").upper_bound == 1.0 and metric_info("hellaswag/acc_norm").upper_bound == 1.0
    assert metric_info("ppl_wikitext2").upper_bound is None and metric_info("ppl_wikitext2").lower_bound == 0.0
    with pytest.raises(ProtocolError, match=r"accuracy in \[0, 1\]"):
        validate_value("hellaswag/acc", 1.5)
    with pytest.raises(ProtocolError, match="must not be negative"):
        validate_value("ppl_ptb", -1.0)
    assert validate_value("wikitext/word_perplexity", 30.5) == 30.5


def test_unknown_names_get_a_close_match():
    with pytest.raises(UnknownMetric, match="did you mean 'mmlu'"):
        metric_info("mmmlu")
    with pytest.raises(UnknownMetric, match="unknown metric 'zzz'"):
        metric_info("zzz")
    # where a value must be stored or sorted anyway, an unknown name is higher-is-better on its own scale
    lenient = metric_info("custom/score", strict=False)
    assert lenient.higher_is_better and lenient.transform == "identity" and not lenient.known
    assert metric_direction("custom/score") == "maximize" and not lower_is_better("custom/score")
