"""Hypothesis strategies for hostile records, and the profiles the property tests run under.

Profiles (HYPOTHESIS_PROFILE selects one; `ci` is the default, so `make test` and CI need nothing set):
- `ci`: derandomized (the same examples on every run and every machine, so a red CI is reproducible and a
  green one is not luck), no example database (nothing written to the work tree), no deadline (a shared
  2-core CI machine has slow moments), bounded examples per test so the whole fuzz suite takes seconds.
- `explore`: random, 20x the examples, failures remembered in .cache/hypothesis: for a developer hunting
  bugs. Whatever it finds belongs in a regular test (`@example` or a plain test), not only in the database.
The `make fuzz` driver does the bulk exploration (a million records), seeded and printed.
"""

from __future__ import annotations

import os
from typing import Any, Final

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from service.apis.openlayer import TASK_RULES
from service.avro.codec import MAX_ID_CHARS
from tests.fuzz.rig import PIPELINE, ROOT

CI_EXAMPLES: Final = 150
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=CI_EXAMPLES,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore",
    derandomize=False,
    database=DirectoryBasedExampleDatabase(str(ROOT / ".cache" / "hypothesis")),
    deadline=None,
    max_examples=CI_EXAMPLES * 20,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(share: float) -> settings:
    """A share of the profile's examples, for tests whose examples are expensive (whole records to draw)."""
    current = settings.default
    assert current is not None  # a profile is loaded above
    return settings(max_examples=max(10, int(current.max_examples * share)))


INT64: Final = (-(2**63), 2**63 - 1)

# --- scalars ---------------------------------------------------------------------------------------------------

# Odd unicode: the astral plane, combining marks, right-to-left and zero-width characters, BOMs, line and
# paragraph separators, controls and NUL. (Lone surrogates cannot be UTF-8, so no Avro string holds one.)
_ODD = "\u0000\u0007\u001b\u007f\u0085\u00a0\u00ad\u0301\u200b\u200d\u200e\u202e\u2028\u2029\ufeff\ufffd\U0001f600"
odd_text = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(_ODD), max_size=40)
# A huge string costs nothing to draw: one character repeated, up to 300k code points (~1.2 MB of UTF-8).
huge_text = st.builds(
    lambda char, count: char * count, st.sampled_from(["x", "é", "\U0001f600", "\u0000"]), st.integers(10_000, 300_000)
)
text = odd_text | huge_text
doubles = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [float("nan"), float("inf"), float("-inf"), -0.0, 5e-324, 1.7976931348623157e308]
)
longs = st.integers(*INT64) | st.sampled_from([INT64[0], INT64[1], 0, -1, 2**53 + 1])
scalars = st.none() | st.booleans() | longs | doubles | odd_text


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=6) | st.dictionaries(odd_text, inner, max_size=6)


# The schema allows up to three containers deep (a row value, then lists/maps of lists/maps of scalars).
nested_values = scalars | _containers(scalars | _containers(scalars | _containers(scalars)))
metadata_values = scalars | _containers(scalars | _containers(scalars))
"""A config's metadata: typed like row values, two containers deep at most."""
wide_map = st.builds(lambda count, value: {f"column_{i}": value for i in range(count)}, st.integers(98, 102), scalars)
"""Around the 100-column limit of Update record (cheap to draw: one value, many columns)."""


def _rows(min_size: int) -> st.SearchStrategy[dict[str, Any]]:
    return (
        st.dictionaries(odd_text, nested_values, min_size=min_size, max_size=8)
        | wide_map
        | st.dictionaries(text, st.none() | text, min_size=min_size, max_size=2)
    )


rows = _rows(0)
nonempty_rows = _rows(1)

# --- ids -------------------------------------------------------------------------------------------------------

ids = st.one_of(
    st.just(PIPELINE),
    st.uuids().map(str),
    odd_text,
    st.sampled_from(["", ".", "..", "../admin", "a/b", "?x=1", "#f", "%2e%2e", " ", "+", "&a=b", "{id}", "%"]),
    st.builds(lambda count: "i" * count, st.integers(MAX_ID_CHARS - 2, MAX_ID_CHARS + 2)),
)

# --- records, as a producer writes them (Avro field names) -----------------------------------------------------

_STRING_KEYS = [
    "output_column_name",
    "context_column_name",
    "question_column_name",
    "cost_column_name",
    "num_of_token_column_name",
    "ground_truth_column_name",
    "user_id_column_name",
    "session_id_column_name",
    "label_column_name",
    "predictions_column_name",
    "prediction_scores_column_name",
    "target_column_name",
    "text_column_name",
    "inference_id_column_name",
    "latency_column_name",
    "timestamp_column_name",
]
_LIST_KEYS = ["input_variable_names", "class_names", "feature_names", "categorical_feature_names"]


@st.composite
def inference_configs(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.booleans()):
        return None
    config: dict[str, Any] = {
        "task_type": draw(st.none() | st.sampled_from(sorted(TASK_RULES))),
        "prompt": draw(
            st.none() | st.lists(st.fixed_dictionaries({"role": st.none() | odd_text, "content": st.none() | text}))
        ),
        "metadata": draw(st.none() | st.dictionaries(odd_text, metadata_values, max_size=4)),
    }
    for key in draw(st.lists(st.sampled_from(_STRING_KEYS), unique=True, max_size=5)):
        config[key] = draw(odd_text)
    for key in draw(st.lists(st.sampled_from(_LIST_KEYS), unique=True, max_size=2)):
        config[key] = draw(st.lists(odd_text, max_size=4))
    return config


@st.composite
def row_update_configs(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.booleans()):
        return None
    keys = [
        "inference_id_column_name",
        "latency_column_name",
        "timestamp_column_name",
        "ground_truth_column_name",
        "human_feedback_column_name",
    ]
    return {key: draw(st.none() | odd_text) for key in keys}


inference_records = st.fixed_dictionaries(
    {
        "inference_pipeline_id": ids,
        "row": rows,
        "inference_id": st.none() | ids,
        "config": inference_configs(),
    }
)
row_update_records = st.fixed_dictionaries(
    {"inference_pipeline_id": ids, "inference_id": ids, "row": rows, "config": row_update_configs()}
)
log_update_records = st.fixed_dictionaries(
    {
        "reference_id": ids,
        "output": st.none() | text,
        "error": st.none() | text,
        "duration": st.none() | doubles | st.floats(0, 1e6),
    }
)
