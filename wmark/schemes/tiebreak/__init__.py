"""Keyed tie-breaking: an API-side mark a surrogate learns as part of the task, with an exact Gaussian null.

Every answer's log-probabilities are shifted by a keyed linear function of the input's features:
``log p_c(x) + beta * u_c(x)`` with ``u_c(x) = <w_c, psi(x)> / sqrt(k)``, where ``psi`` is a fixed feature
map (the served model's penultimate activations, centred and whitened on their top ``k`` principal
directions, optionally after leaving the ``skip`` largest out) and ``w_c ~ N(0, I_k)`` is drawn from the
key, one direction per class. The marked API is thus the served network with a slightly different, keyed linear head: confident answers keep their
label, near-ties follow the keyed shift, exposed scores carry it everywhere. A surrogate trained on the
answers learns that head as part of the task; isolated keyed flips (:mod:`wmark.schemes.api_mark`) are
memorised late instead, and a surrogate that stops training early never inherits them. (The measurements
behind these choices are in ``docs/research/tiebreak.md``.)

The rule file (:func:`build_tiebreak_rule`, once, from the owner's own inputs) stores the feature map:
fixed before any suspect exists and never read from a suspect. The directions ``w`` are re-derived from
the key and never stored.

Verification (:func:`tiebreak_test`) and why its null is exact. The owner picks ``n`` of its own held
inputs, never ones a client chose, by a key-independent criterion, and commits them in the rule file
when it is built: those where *reference surrogates* — models the owner distils from the **unmarked**
served model, several architectures and training lengths (:func:`train_reference_surrogates`) — are
closest to a tie between the served model's top two classes ``{a, b}`` (smallest ``|mean_r log(p_r(a) /
p_r(b))|``; without references, the served model's own nearest ties, largest ``p_b / p_a``). There a
surrogate's own fit leaves the call open and the keyed lean it learnt decides it. The suspect answers them; ``s_i = +1`` if it answers
the pair's smaller class index, ``−1`` for the larger, ``0`` otherwise (abstentions carry no evidence). A
suspect that answers with probabilities (a leaked model file, an API that returns them) gives more:
``s_i = log(p_lo / p_hi)`` clipped at ``±2``, which also counts the calls it moved without flipping. A text
rule reads labels **centred** (:func:`expected_signs`): each in-pair ``s_i`` less the served model's own
expected sign in its pair, ``(p_lo − p_hi) / (p_lo + p_hi)``. Near a tie a suspect's calls still follow its
own fit, largely a linear function of the same features; that key-free part of the sums adds to their norm,
not to their projection on the keyed directions. With ``phi_i`` the features centred per pair over the
chosen inputs,
``v_c = Σ_i phi_i (s_i ([lo_i = c] − [hi_i = c]) + t_i ([o_i = c] − ([lo_i = c] + [hi_i = c]) / 2))``
and ``Z = Σ_c <w_c, v_c> / sqrt(Σ_c |v_c|²)``, where a label ``o_i`` outside the pair counts with
``t_i = OUTSIDE_WEIGHT`` (1; an in-pair label weighs 2 on the same scale): the keyed head raised that
class against the pair. ``H0``: the suspect was made without access to the marked
answers. Under ``H0`` (HMAC-SHA256 as a pseudo-random function) the ``w_c`` are independent standard
normal vectors, independent of the suspect's answers, of the inputs and of the features (which come from
the served model, the references distilled from it and the owner's data, never from the key), and the
``s_i`` are functions of the suspect's answers and the served model's scores alone; given all of those,
``Z`` is a fixed linear combination of independent standard normals with unit variance, so **Z ~ N(0, 1) exactly** and
``p = P(N(0, 1) ≥ Z)``, computed in log space. The inputs share the ``w_c``, so per-input agreements are
correlated; the statistic accounts for that, a per-input binomial would not. (Gaussian draws come from
32-bit uniforms by Box–Muller; the discretisation is far below any reported p-value.)

The test is fixed-n: the owner fixes ``n`` before querying, and the report records it.

Text classifiers (a key with a text modality) work the same way: inputs are strings everywhere (the API's
queries, the rule's committed inputs, the log), the features are the served model's penultimate activations
of the tokenized strings, and the reference surrogates are text models (``text-bow``) distilled from the
unmarked served model on the owner's texts. Nothing of that reads the key, so the null is the same exact
N(0, 1); :mod:`wmark.schemes.tiebreak.inputs` refuses strings for an image key and tensors for a text key.

A client's own queries (:func:`tiebreak_log_test`). The API can log each client's near-tie inputs
(:class:`~wmark.schemes.querylog.TieBreakLog`, the API's query log). A surrogate was fitted to exactly
those inputs and the marked answers it got there, so asking it them again (the ones the rule's reference
surrogates leave most open) gives much stronger evidence than the owner's inputs. The same ``Z`` is exactly
N(0, 1) provided the client's inputs do not depend on the key, i.e. the client did not choose its queries by
the answers it got (a fixed dataset, as extraction attacks use): an assumption the verdict states, and one
the committed-input test does not need. The test asks in rounds: the first by the references' ranking,
the later ones where the suspect's own earlier answers put it closest to a tie. Those rounds depend on the
suspect's answers and key-free quantities only, so under ``H0`` the inputs asked stay independent of the
key's directions and ``Z`` stays exactly N(0, 1). That fixed-n test asks a number of inputs fixed in advance;
:func:`tiebreak_log_sequential` (:mod:`wmark.schemes.tiebreak.sequential`, ``wmark verify extraction
--log-sequential``) keeps asking the client's logged inputs until an e-process over the Gram–Schmidt projections
of its pair sums decides, the log runs out or a stated budget is reached, with alpha kept under that
optional stopping.

Example:
    >>> import numpy as np
    >>> from wmark.keys import generate_key
    >>> key = generate_key(owner="ACME", num_classes=3, input_shape=(5,))
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(300, 5)).astype(np.float32)
    >>> scores = rng.dirichlet(np.ones(3), size=300)
    >>> rule = build_tiebreak_rule(key=key, x=x, featurizer=lambda v: v, feature_space="identity",
    ...                            components=4)
    >>> rule.directions.shape
    (3, 4)
"""

from wmark.distill import REFERENCE_QUERIES, REFERENCE_RECIPES, REFERENCE_REPEATS, train_reference_surrogates
from wmark.schemes.querylog import LOG_FORMAT, LOG_MIN_RATIO, TEXT_LOG_FORMAT, TieBreakLog
from wmark.schemes.tiebreak.inputs import owner_texts
from wmark.schemes.tiebreak.rule import (
    DEFAULT_BETA,
    DEFAULT_COMPONENTS,
    DEFAULT_PAIR_RATIO,
    DEFAULT_QUERIES,
    SCHEME,
    VERSION,
    TieBreakRule,
    build_tiebreak_rule,
    commit_verification_inputs,
    load_tiebreak_rule,
    open_tiebreak_rule,
    pair_log_odds,
    reference_lean,
    reference_leans,
    select_verification_inputs,
    top_pairs,
)
from wmark.schemes.tiebreak.sequential import (
    SEQUENTIAL_BUDGET,
    SEQUENTIAL_RHO,
    SEQUENTIAL_ROUND,
    tiebreak_log_sequential,
)
from wmark.schemes.tiebreak.serving import (
    BETA_GRID,
    COST_CONFIDENCE,
    KeyTriggers,
    TieBreakAPI,
    accuracy_cost,
    accuracy_costs,
    largest_beta_within,
)
from wmark.schemes.tiebreak.statistic import (
    LEAN_CLIP,
    OUTSIDE_WEIGHT,
    centres,
    expected_evidence,
    expected_signs,
    probability_leans,
    tiebreak_statistic,
    z_log10_p,
)
from wmark.schemes.tiebreak.tests import (
    DEFAULT_LOG_ROUNDS,
    FOLLOWED_REFERENCES,
    LOG_FIRST_ROUND,
    LOG_TEST_WEIGHT,
    LogInputs,
    TieBreakLogTest,
    TieBreakTest,
    select_log_inputs,
    tiebreak_log_test,
    tiebreak_test,
    tiebreak_tests_from_files,
)

__all__ = [
    "BETA_GRID", "COST_CONFIDENCE", "DEFAULT_BETA", "DEFAULT_COMPONENTS", "DEFAULT_LOG_ROUNDS", "DEFAULT_PAIR_RATIO", "DEFAULT_QUERIES",
    "FOLLOWED_REFERENCES", "LEAN_CLIP", "LOG_FIRST_ROUND", "LOG_FORMAT", "LOG_MIN_RATIO", "LOG_TEST_WEIGHT",
    "OUTSIDE_WEIGHT", "REFERENCE_QUERIES", "REFERENCE_RECIPES", "REFERENCE_REPEATS", "SCHEME", "SEQUENTIAL_BUDGET",
    "SEQUENTIAL_RHO", "SEQUENTIAL_ROUND", "TEXT_LOG_FORMAT", "VERSION",
    "KeyTriggers", "LogInputs", "TieBreakAPI", "TieBreakLog", "TieBreakLogTest", "TieBreakRule", "TieBreakTest", "accuracy_cost",
    "accuracy_costs", "build_tiebreak_rule", "centres", "commit_verification_inputs", "expected_evidence", "expected_signs", "largest_beta_within", "load_tiebreak_rule", "open_tiebreak_rule", "owner_texts",
    "pair_log_odds", "probability_leans", "reference_lean", "reference_leans", "select_log_inputs",
    "select_verification_inputs", "tiebreak_log_sequential", "tiebreak_log_test", "tiebreak_statistic", "tiebreak_test",
    "tiebreak_tests_from_files", "top_pairs", "train_reference_surrogates", "z_log10_p",
]
