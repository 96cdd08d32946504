"""High-level, keyword-only functions over files: what the CLI calls, usable from Python as well.

Example:
    >>> import tempfile, os
    >>> from wmark.api import keygen
    >>> path = os.path.join(tempfile.mkdtemp(), "acme.key")
    >>> info = keygen(owner="ACME Corp", out=path)
    >>> oct(os.stat(path).st_mode & 0o777)
    '0o600'
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from wmark import remote as _remote
from wmark.attacks import finetune as finetune_attack
from wmark.attacks import noise as noise_attack
from wmark.attacks import permute as permute_attack
from wmark.attacks import prune as prune_attack
from wmark.attacks import quantize as quantize_attack
from wmark.attacks import rename_tensors
from wmark.data import Dataset, load_dataset
from wmark.embed import Watermarker
from wmark.errors import UsageError, WmarkError
from wmark.io import read_metadata, save_model, save_tensors, wmark_metadata
from wmark.keys import Key, generate_key, load_key, save_key
from wmark.models import (
    build_model,
    check_key_fits_arch,
    fitted_classes,
    load_model,
    model_metadata,
    recorded_classes,
    recorded_classes_note,
    recorded_shape_note,
    resolve_arch,
)
from wmark.suspects import LocalSuspect
from wmark.text import TextInputs, check_recorded_tokenizer, recorded_tokenizer, recorded_tokenizer_note
from wmark.training import accuracy, check_schedule, make_loader, resolve_device, train_epochs
from wmark.verify import DEFAULT_ALPHA, Mode, Verdict, Verifier, assemble_tests

PathLike = str | os.PathLike[str]
# test inputs a cost target is checked on at least (with fewer, one answer moves the cost by a third of a point)
MIN_COST_INPUTS = 300


def keygen(*, owner: str, out: PathLike, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28),
           num_triggers: int = 100, overwrite: bool = False, message: str | None = None,
           tokenizer: str | None = None, max_length: int = 64) -> dict[str, Any]:
    """Generate a key, write it (mode 0600) and return its public description with the commitment.

    ``message`` (e.g. "ACME Corp 2026") becomes the weight watermark's payload, with repetition-code
    redundancy; it is a public key parameter, so the commitment covers it. With ``tokenizer`` (a name from
    :func:`wmark.text.load_tokenizer`) the key is a text key for inputs of at most ``max_length`` tokens
    (``input_shape`` is then ignored).
    """
    if Path(out).exists() and not overwrite:
        raise UsageError(f"{out} already exists; refusing to overwrite a key (`--force`, or overwrite=True in Python, replaces it).")
    schemes = None
    if message is not None:
        from wmark.keys import default_schemes
        from wmark.schemes.weights import params_for_message

        schemes = default_schemes(num_triggers)
        schemes["weights"] = params_for_message(message)
    modality = None
    if tokenizer is not None:
        from wmark.keys import default_schemes
        from wmark.text import load_tokenizer, text_modality

        modality = text_modality(tokenizer=load_tokenizer(tokenizer), name=tokenizer, max_length=max_length)
        text_schemes = default_schemes(num_triggers, kind="text")
        schemes = text_schemes if schemes is None else dict(schemes, trigger=text_schemes["trigger"])
    key = generate_key(owner=owner, num_classes=num_classes, input_shape=tuple(input_shape),
                       num_triggers=num_triggers, schemes=schemes, modality=modality)
    save_key(key, out)
    return {"commitment": key.commitment(), **key.public_params()}


def _fit(model: torch.nn.Module, loader: Any, *, epochs: int, lr: float, progress: bool, desc: str) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    train_epochs(model, loader, epochs=epochs, optimizer=optimizer, progress=progress, desc=desc)
    return time.perf_counter() - start


def train(*, arch: str, data: str, out: PathLike, epochs: int = 3, seed: int = 0, lr: float = 1e-3,
          batch_size: int = 64, max_samples: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Train a model from scratch (no watermark) and save it; returns its test accuracy and timing.

    A model trained on text records the data's tokenization (:attr:`wmark.data.Dataset.modality`), as ``embed``
    records a text key's, so ``embed`` can refuse a key made with another tokenizer and the file can be served.
    """
    check_schedule(epochs=epochs, lr=lr, batch_size=batch_size)
    ds = load_dataset(data).subset(max_samples=max_samples)
    model = build_model(arch, num_classes=ds.num_classes, input_shape=ds.input_shape, seed=seed)
    seconds = _fit(model, make_loader(ds.x_train, ds.y_train, batch_size=batch_size, seed=seed),
                   epochs=epochs, lr=lr, progress=progress, desc="train")
    acc = accuracy(model, ds.x_test, ds.y_test)
    modality = {} if ds.modality is None else {"modality": ds.modality}
    save_model(model, out, metadata=model_metadata(arch=arch, num_classes=ds.num_classes, input_shape=ds.input_shape,
                                                   seed=seed, test_accuracy=acc, **modality))
    return {"out": str(out), "test_accuracy": acc, "seconds": seconds}


def embed(*, key: PathLike, arch: str, weights: PathLike, data: str, out: PathLike,
          schemes: Sequence[str] = ("trigger",), epochs: int = 4, seed: int = 0, lr: float = 5e-4,
          batch_size: int = 64, trigger_per_batch: int | None = None, max_samples: int | None = None,
          weights_layer: str | None = None, progress: bool = False,
          trigger_lookahead: float | None = None, trigger_margin: float | None = None,
          trigger_mixing: bool | None = None) -> dict[str, Any]:
    """Fine-tune ``weights`` with the key's watermark(s) and save the marked model.

    With ``schemes=()`` this is the identical fine-tune without a watermark, the baseline for fidelity
    and overhead measurements. ``trigger_lookahead``, ``trigger_margin``, ``trigger_mixing`` and ``trigger_per_batch`` are
    :class:`~wmark.embed.Watermarker`'s options of those names (None: its defaults).
    """
    check_schedule(epochs=epochs, lr=lr, batch_size=batch_size)
    k = load_key(key)
    ds = load_dataset(data).subset(max_samples=max_samples)
    _check_key_fits_data(k, ds)
    check_recorded_tokenizer(k.modality, ds.tokenizer, what=f"The data {data}")
    check_recorded_tokenizer(k.modality, recorded_tokenizer(wmark_metadata(read_metadata(weights))),
                             what=f"The model file {weights}")
    check_key_fits_arch(k.modality, arch)
    model, _ = load_model(arch, weights, num_classes=ds.num_classes, input_shape=ds.input_shape)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = make_loader(ds.x_train, ds.y_train, batch_size=batch_size, seed=seed)
    wm = (Watermarker(k, schemes=schemes, trigger_per_batch=trigger_per_batch, weights_layer=weights_layer,
                      trigger_lookahead=trigger_lookahead, trigger_margin=trigger_margin,
                      trigger_mixing=trigger_mixing) if schemes else None)
    if wm is not None:
        model, _, loader = wm.attach(model=model, optimizer=optimizer, data_loader=loader)
    start = time.perf_counter()
    try:
        train_epochs(model, loader, epochs=epochs, optimizer=optimizer, progress=progress, desc="embed")
    finally:
        if wm is not None:
            wm.detach()
    seconds = time.perf_counter() - start
    acc = accuracy(model, ds.x_test, ds.y_test)
    meta = model_metadata(arch=arch, num_classes=ds.num_classes, input_shape=ds.input_shape, test_accuracy=acc)
    if wm is not None:
        meta.update(wm.metadata())
    elif k.modality is not None:
        # the unmarked baseline of a text key still records its tokenization, so it can be served as text
        meta["modality"] = k.modality
    save_model(model, out, metadata=meta)
    return {"out": str(out), "test_accuracy": acc, "seconds": seconds, "schemes": list(schemes)}


def _check_key_fits_data(key: Key, ds: Dataset) -> None:
    key_c, key_shape, c, shape = key.num_classes, tuple(key.input_shape), ds.num_classes, tuple(ds.input_shape)
    if key_c != c:
        raise UsageError(f"The key is for {key_c} classes but the data has {c}; make a key for {c} classes.")
    text_data, text_key = ds.texts_train is not None, key.modality is not None
    if text_data != text_key:
        raise UsageError(f"The key is {'a text' if text_key else 'an image'} key but the data are "
                         f"{'texts' if text_data else 'images'}; make a key with "
                         f"{'--modality text' if text_data else '--modality image'} for them.")
    if text_key and key_shape != shape:
        raise UsageError(f"The key's texts are at most {key_shape[0]} tokens but the data's are {shape[0]}; make a "
                         f"key with --max-length {shape[0]}.")
    if key_shape != shape:
        raise UsageError(
            f"The key's input shape {key_shape} differs from the data's {shape}; make a key for inputs shaped "
            f"{','.join(map(str, shape))}."
        )


def verify(*, key: PathLike, arch: str, suspect: PathLike, alpha: float = DEFAULT_ALPHA,
           mode: Mode = "sequential", max_queries: int | None = None, labels_only: bool = True,
           log: PathLike | None = None, client: str | None = None, rule: PathLike | None = None,
           served: PathLike | None = None, served_arch: str | None = None, holdout: str | None = None,
           rule_queries: int = 1000, log_queries: int | None = None, log_rounds: int = 21,
           log_mode: Mode = "fixed", device: str | None = None, progress: bool = False) -> Verdict:
    """Black-box verification of a model file: query it on the key's triggers and test the matches.

    With a marked API's query ``log`` and a ``client``, the suspect is also asked that client's logged
    queries: the flip-mark test for a flip-mark log, the tie-break log test for a tie-break log (with the
    ``rule`` the API served with). A tie-break ``rule`` also adds the committed-input test (its first
    ``rule_queries`` inputs; 0 skips it next to a log). The tie-break log test asks ``log_queries`` (default
    1000) in ``log_rounds`` rounds, or with ``log_mode="sequential"`` until its evidence suffices (at most
    ``log_queries``, default 10,000). The tie-break tests read the suspect's labels; with ``labels_only=False``
    its probabilities (the suspect then exposes them). The served model is the one the rule records
    (``served``/``served_arch`` only if it moved). All tests are combined by :class:`wmark.evidence.Verifier`
    (weighted Holm, 8 to 1 towards the log test); the verdict's ``kind`` is ``copy`` if the trigger set is
    found, ``extracted`` if only an API-side mark is. See :func:`wmark.verify.assemble_tests`.

    The suspect answers on ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``; default CUDA when present). Its
    answers are recorded, so a re-check needs no device. The owner's served model, which ranks a tie-break
    log, stays on the CPU: the ranking is recomputed by ``wmark recheck`` and must come out the same there.

    The suspect is sized by the key: its weights must fit a model of the key's classes (one whose output layer
    has another size is refused, naming the count its weights are for). A suspect whose file records another
    class count or input shape than the key's, or another tokenizer than a text key's, is verified all the same (on the
    triggers the key's tokenizer makes); the verdict's ``message`` says what the file records.
    """
    on = resolve_device(device)
    k = load_key(key)
    meta = wmark_metadata(read_metadata(suspect))
    check_key_fits_arch(k.modality, arch)
    shape = tuple(k.input_shape)
    try:
        model, _ = load_model(arch, suspect, num_classes=k.num_classes, input_shape=shape)
    except UsageError:
        # Sized by the key, not by what the file records: only the weights say which key they are for.
        fitted = fitted_classes(arch, suspect, input_shape=shape, other_than=k.num_classes)
        if fitted is None:
            raise
        raise UsageError(f"The key is for {k.num_classes}-class models but the weights in {suspect} are for "
                         f"{fitted} {'class' if fitted == 1 else 'classes'}; use the key made for this model.") from None
    model.to(on)
    # Not refused: the suspect's holder wrote its metadata, and a thief could write another class count or
    # tokenizer into it to block us. The weights fit the key (the forward's logits are checked when it answers).
    what = f"The model file {suspect}"
    notes = [recorded_classes_note(meta, k.num_classes, what=what), recorded_shape_note(meta, shape, what=what),
             recorded_tokenizer_note(k.modality, recorded_tokenizer(meta), what=what)]
    from wmark.recording import RecordingSuspect, tiebreak_files

    local = RecordingSuspect(LocalSuspect(model, input_shape=tuple(k.input_shape), description=str(suspect),
                                          expose_scores=not labels_only, text=TextInputs.from_key(k)))
    tests = assemble_tests(key=k, mode=mode, max_queries=max_queries, progress=progress, log=log, client=client,
                           rule=rule, served=served, served_arch=served_arch, holdout=holdout,
                           rule_queries=rule_queries, log_queries=log_queries, log_rounds=log_rounds,
                           log_mode=log_mode, use_scores=not labels_only)
    verdict = Verifier(key=k, alpha=alpha, tests=tests).run(suspect=local, description=str(suspect))
    verdict.message = " ".join(filter(None, [verdict.message, *notes]))
    files = tiebreak_files(rule=rule, served=served, served_arch=served_arch, holdout=holdout,
                           queries=rule_queries)
    return local.attach(verdict, suspect_file=suspect, tiebreak=files)


def build_tiebreak(*, key: PathLike, arch: str, weights: PathLike, data: str, out: PathLike,
                   components: int | None = None, skip: int = 0,
                   references: Sequence[str] | None = None, verify_count: int = 1000,
                   seed: int = 0, reference_repeats: int | None = None,
                   max_samples: int | None = None, device: str | None = None,
                   max_cost: float | None = None, features: str = "served") -> dict[str, Any]:
    """Build the keyed tie-break rule for the served model ``weights`` from the owner's ``data``; write ``out``.

    The rule file holds the key-independent feature map (no secret, no directions) and the owner's ranked
    verification inputs, committed now, before any suspect exists: the ``verify_count`` inputs of ``data``
    whose call between the served model's top two classes reference surrogates leave most open. The
    references are distilled from the *unmarked* served model (architectures ``references``; default: the
    served one and ``fmnist-mlp``, for a text key ``text-bow``; empty: no references, the served model's nearest
    ties), ``reference_repeats`` per architecture and recipe (default ``REFERENCE_REPEATS``, each from its own
    seed; for a text key one, as a bag-of-words reference stores a vocabulary-sized embedding). For a text key
    the owner's inputs are the dataset's texts (those within the key's maximum length) and the rule commits
    strings. ``max_samples`` keeps the first that many of ``data``'s training inputs (the owner's own subset). Serve with
    :class:`~wmark.schemes.tiebreak.TieBreakAPI` (``wmark serve --mark tiebreak``) and verify with
    ``verify(..., rule=out)``. The rule records the served model's architecture, path and digest. The served
    model and the references run on ``device`` (default CUDA when present).

    The result's ``honest_cost`` is what the marked API costs honest clients on ``data``'s test split (accuracy
    points lost with their standard error, answers changed), measured for this key, since it varies by key.
    With ``max_cost`` (accuracy points) the rule records the largest scale of the keyed shift (up to 1 for the
    served map, 1.5 for the public encoder's: :data:`~wmark.schemes.tiebreak.features.COST_GRIDS`) whose cost (and every smaller scale's) is at most that with 90 % one-sided confidence on the test split
    (:func:`~wmark.schemes.tiebreak.largest_beta_within`); the API serves it unless told another. A lower cost
    catches fewer thieves (docs/extraction.md, "Which point to choose").

    ``features`` names the feature map the keyed shift is read from: ``served``, the served model's own
    penultimate features, or ``public``, the public all-MiniLM-L6-v2 encoder's mean-pooled features (a text key
    over its tokenizer, for a served model fine-tuned from it: at the same cost bound, stronger evidence on average
    but no more thieves caught, for a second encoder forward per request; :mod:`wmark.schemes.tiebreak.features`).

    Raises:
        UsageError: On mismatched files or settings, ``public`` features for an image key or another tokenizer,
            or when ``max_cost`` is given and the data's test split has fewer than ``MIN_COST_INPUTS`` inputs the
            API takes, or no scale costs that little (refused before the references train; nothing is written).
    """
    from wmark.io import load_tensors, tensors_digest
    from wmark.schemes.tiebreak import (
        DEFAULT_BETA,
        REFERENCE_RECIPES,
        REFERENCE_REPEATS,
        build_tiebreak_rule,
        commit_verification_inputs,
        train_reference_surrogates,
    )
    from wmark.schemes.tiebreak.features import COST_GRIDS, chosen_space, rule_featurizer
    from wmark.schemes.tiebreak.inputs import owner_texts

    on = resolve_device(device)
    k = load_key(key)
    space = chosen_space(features, key=k)
    ds = load_dataset(data).subset(max_samples=max_samples)
    _check_key_fits_data(k, ds)
    if verify_count < 1:
        raise UsageError(f"The number of verification inputs to commit must be at least 1, got {verify_count}.")
    if max_cost is not None and not 0 < max_cost <= 100:
        raise UsageError(f"max_cost is in accuracy points, above 0 and at most 100; got {max_cost}.")
    if max_cost is not None and len(ds.y_test) == 0:
        raise UsageError(f"{data} has no test split to measure the cost on; drop max_cost or use data with one.")
    text = TextInputs.from_key(k)
    default_refs = ["text-bow"] if text is not None else [arch, "fmnist-mlp"]
    archs = list(dict.fromkeys(default_refs if references is None else references))
    for name in archs:
        resolve_arch(name)
    check_key_fits_arch(k.modality, arch)
    model, _ = load_model(arch, weights, num_classes=k.num_classes, input_shape=tuple(k.input_shape))
    model.to(on)
    served = LocalSuspect(model, input_shape=tuple(k.input_shape), description=str(weights), expose_scores=True,
                          text=text)
    start = time.perf_counter()
    tensors, raw = load_tensors(weights)
    x: Any = ds.x_train.numpy() if text is None else owner_texts(ds.texts_train or (), text)
    featurizer, features_digest = rule_featurizer(space, served_model=model, text=text, device=on)
    rule = build_tiebreak_rule(key=k, x=x, featurizer=featurizer, feature_space=space, components=components,
                               skip=skip, model_digest=tensors_digest(tensors, raw), text=text,
                               features_digest=features_digest)
    # the cost depends only on the feature map, the key and the served model: a target no scale meets is refused
    # before the references train
    cost = _test_split_cost(k, served, rule, ds, text, max_cost, COST_GRIDS[space])
    repeats = (1 if text is not None else REFERENCE_REPEATS) if reference_repeats is None else reference_repeats
    refs = train_reference_surrogates(served=served, x=x, archs=archs, seed=seed, repeats=repeats,
                                      text=text, device=on) if archs else []
    recipes = ", ".join(f"{labels} {epochs} ep" for labels, epochs in REFERENCE_RECIPES) + f"; {repeats} seed{'s' if repeats != 1 else ''} each"
    rule = commit_verification_inputs(rule, served=served, x=x, references=refs, count=verify_count,
                                      how=f"{' and '.join(archs)}; {recipes}; distilled from the unmarked served model")
    rule = dataclasses.replace(rule, served_arch=arch, served_path=os.path.abspath(weights),
                               input_shape=tuple(k.input_shape), beta=DEFAULT_BETA if cost is None else cost["beta"])
    rule.save(out)
    return {"out": str(out), "feature_space": rule.feature_space, "components": rule.components,
            "skipped": rule.skipped, "inputs": len(x),
            "references": len(refs),
            "verification_inputs": len(rule.verification_inputs), "verification": rule.verification,  # type: ignore[arg-type]
            "honest_cost": cost, "seconds": time.perf_counter() - start}


def _test_split_cost(key: Key, served: LocalSuspect, rule: Any, ds: Dataset, text: TextInputs | None,
                     max_cost: float | None, grid: Sequence[float]) -> dict[str, Any] | None:
    """What the marked API costs honest clients on the data's test split (``None``: no split), at the default scale
    or, with ``max_cost``, at the largest scale of ``grid`` within it.

    The cost of a scale depends on the key about twofold, so the owner sees their own key's before serving it.
    A text API takes only texts within the key's maximum length, so those are the ones scored.
    """
    import numpy as np

    from wmark.schemes.tiebreak import (
        COST_CONFIDENCE,
        DEFAULT_BETA,
        TieBreakAPI,
        accuracy_costs,
        largest_beta_within,
    )
    from wmark.schemes.tiebreak.inputs import fitting_texts

    y = ds.y_test.numpy()
    x: Any = ds.x_test.numpy()
    if text is not None:
        texts = ds.texts_test or ()
        fits = fitting_texts(texts, text)
        x, y = np.empty(len(fits), dtype=object), y[fits]
        x[:] = [texts[i] for i in fits]
    if len(x) == 0:
        if max_cost is not None:
            raise UsageError("None of the test split's texts fit the key's maximum length, so the cost cannot be "
                             "measured; drop max_cost or use a key with a longer maximum length.")
        return None
    if max_cost is not None and len(x) < MIN_COST_INPUTS:
        raise UsageError(f"The test split has {len(x)} inputs the API takes; bounding the cost needs at least "
                         f"{MIN_COST_INPUTS}: drop max_cost or use data with a larger test split.")
    marked = TieBreakAPI(key=key, backend=served, rule=rule, beta=DEFAULT_BETA, expose_scores=False)
    costs = accuracy_costs(api=marked, x=x, y=y, betas=[DEFAULT_BETA] if max_cost is None else grid)
    if max_cost is None:
        return {"test_inputs": len(x), **costs[0]}
    chosen = largest_beta_within(costs, max_cost, confidence=COST_CONFIDENCE)
    if chosen is None:
        low = costs[0]
        raise UsageError(f"No scale of the mark costs at most {max_cost:g} accuracy points with "
                         f"{100 * COST_CONFIDENCE:g} % confidence on the test split: the smallest tried, beta "
                         f"{low['beta']:g}, costs {low['accuracy_cost_pp']:.2f} ± {low['cost_se_pp']:.2f}; raise the "
                         "cost allowed, or serve unmarked and mark only clients the monitor flags.")
    return {"test_inputs": len(x), **chosen, "max_cost_pp": float(max_cost), "confidence": COST_CONFIDENCE,
            "default_cost_pp": next(c["accuracy_cost_pp"] for c in costs if c["beta"] == DEFAULT_BETA)}


def verify_whitebox(*, key: PathLike, reference: PathLike, suspect: PathLike, alpha: float = DEFAULT_ALPHA,
                    anchor: PathLike | None = None) -> Verdict:
    """White-box verification: test the key's weight watermark in a suspect file (no architecture needed).

    Pass ``anchor`` (the unmarked base model ``reference`` was fine-tuned from) whenever you have it: the
    alignment then never reads a key-dependent weight and the Binomial null is exact by construction.
    See :func:`wmark.whitebox.verify.verify_whitebox`.
    """
    from wmark.whitebox.verify import verify_whitebox as _verify

    return _verify(key=load_key(key), reference=reference, suspect=suspect, alpha=alpha, anchor=anchor)


verify_remote = _remote.verify_remote


def write_report(*, verdict: Verdict, key: PathLike, path: PathLike) -> dict[str, Any]:
    """Write the evidence report of a verdict (HTML at ``path``, JSON next to it); return the JSON document."""
    from wmark.report import write_report as _write

    return _write(verdict=verdict, key=load_key(key), path=path)


def attack(*, kind: str, arch: str, weights: PathLike, out: PathLike, data: str | None = None, epochs: int = 5,
           lr: float = 1e-3, layers: str = "all", sparsity: float = 0.5, bits: int = 8, seed: int = 0,
           std: float = 0.1, max_samples: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Apply one attack to a model file and write the attacked copy; returns its test accuracy if data is given.

    ``kind`` is one of finetune, prune, quantize, noise, permute, rename. A renamed copy no longer loads
    into ``arch`` (that is the point); its accuracy is measured before renaming, which changes no number.
    """
    if kind == "finetune":
        check_schedule(epochs=epochs, lr=lr)
    ds = load_dataset(data).subset(max_samples=max_samples) if data else None
    model, metadata = load_model(arch, weights)
    meta = wmark_metadata(metadata)
    if ds is not None:
        _check_data_fits_model(ds, meta, data=data, weights=weights)
    params: dict[str, Any]
    if kind == "finetune":
        if ds is None:
            raise UsageError("The finetune attack needs the attacker's own training data (data=).")
        attacked = finetune_attack(model, x=ds.x_train, y=ds.y_train, epochs=epochs, lr=lr, layers=layers,  # type: ignore[arg-type]
                                   seed=seed, progress=progress)
        params = {"epochs": epochs, "lr": lr, "layers": layers, "samples": len(ds.x_train), "seed": seed}
    elif kind == "prune":
        attacked = prune_attack(model, sparsity=sparsity)
        params = {"sparsity": sparsity}
    elif kind == "quantize":
        attacked = quantize_attack(model, bits=bits)
        params = {"bits": bits}
    elif kind == "noise":
        attacked = noise_attack(model, std=std, seed=seed)
        params = {"std": std, "seed": seed}
    elif kind == "permute":
        attacked = permute_attack(model, seed=seed)
        params = {"seed": seed}
    elif kind == "rename":
        attacked = model
        params = {"seed": seed}
    else:
        raise UsageError(f"Unknown attack {kind!r}.")
    # the modality too: without it an attacked text model is served, extracted and verified as an image model
    keep = {k: v for k, v in meta.items() if k in ("arch", "num_classes", "input_shape", "modality")}
    acc = accuracy(attacked, ds.x_test, ds.y_test) if ds is not None else None
    attack_meta = {**keep, "attack": {"kind": kind, **params}, "test_accuracy": acc}
    if kind == "rename":
        save_tensors(rename_tensors(attacked.state_dict(), seed=seed), out, metadata=attack_meta)
    else:
        save_model(attacked, out, metadata=attack_meta)
    return {"out": str(out), "attack": kind, "params": params, "test_accuracy": acc}


def _check_data_fits_model(ds: Dataset, meta: dict[str, Any], *, data: str | None, weights: PathLike) -> None:
    """Refuse attack data with more classes than the model's, or images of another shape (token ids are trimmed to
    the model's length): fine-tuning on them failed deep in PyTorch, and a measured accuracy meant nothing."""
    classes, shape = recorded_classes(meta, weights), tuple(int(d) for d in meta["input_shape"])
    if ds.num_classes > classes or (ds.texts_train is None and tuple(ds.input_shape) != shape):
        raise UsageError(f"The data {data} has {ds.num_classes} classes of inputs shaped {tuple(ds.input_shape)} but "
                         f"the model {weights} has {classes} classes and takes inputs shaped {shape}; give data "
                         "like the model's.")


def extract(*, victim_arch: str | None, victim: PathLike | None, arch: str, data: str, out: PathLike,
            labels: str = "hard", queries: int = 10_000, epochs: int = 6, lr: float = 1e-3, seed: int = 0,
            key: PathLike | None = None, mark: str | None = None, rule: PathLike | None = None,
            log: PathLike | None = None, client: str = "attacker", rate: float | None = None,
            candidates: str | int | None = None, beta: float | None = None, until_accuracy: float | None = None,
            progress: bool = False) -> dict[str, Any]:
    """Extract a surrogate of ``victim`` from its answers to the attacker's ``data`` and save it.

    With ``until_accuracy`` the thief stops after the first epoch whose accuracy on ``data``'s test split
    reaches it (``epochs`` is then the cap): the least-trained surrogate that meets a quality bar. With a
    ``mark`` and the owner's ``key`` the victim is served behind that marked API (:func:`wmark.marks.open_served`:
    ``tiebreak`` with ``rule``, whose served model is the victim unless ``victim`` names it, or ``flip``), its
    queries logged under ``client`` in ``log`` when given: the path a real thief's queries take. A text victim
    (a text key, or a model file recording a text modality) is asked ``data``'s texts within its maximum
    length, as strings, and ``arch`` is then a text architecture. Returns the surrogate's test accuracy and its
    agreement with the victim.
    """
    from wmark.attacks.extract import accuracy_reached
    from wmark.attacks.extract import extract as run_extract
    from wmark.distill import check_accuracy_target
    from wmark.marks import answerer_for, open_served
    from wmark.schemes.tiebreak.inputs import owner_texts
    from wmark.text_serving import text_inputs_of
    from wmark.training import predict_logits

    check_schedule(epochs=epochs, lr=lr)
    if until_accuracy is not None:
        check_accuracy_target(until_accuracy)
    ds = load_dataset(data)
    k = None if key is None else load_key(key)
    if k is not None:
        _check_key_fits_data(k, ds)
        check_recorded_tokenizer(k.modality, ds.tokenizer, what=f"The data {data}")
    resolve_arch(arch)
    served = open_served(key=k, mark=mark, arch=victim_arch, weights=victim, rule=rule, beta=beta, rate=rate,
                         candidates=candidates, log=log, client=client)
    try:
        text = TextInputs.from_key(k) if k is not None else text_inputs_of(wmark_metadata(read_metadata(served.weights)))
        x: Any = ds.x_train if text is None else owner_texts(ds.texts_train or (), text)
        target = answerer_for(served)
        stop = None if until_accuracy is None else accuracy_reached(ds.x_test, ds.y_test, until_accuracy)
        result = run_extract(target, x=x, arch=arch, labels=labels, queries=queries,  # type: ignore[arg-type]
                             epochs=epochs, lr=lr, seed=seed, progress=progress, stop=stop, text=text)
    except WmarkError:
        # refused before a query was answered: a log this call created holds nothing worth keeping
        if served.log is not None and not served.log.clients():
            served.log.discard()
        raise
    finally:
        served.close()
    surrogate, model = result.model, served.model
    acc = accuracy(surrogate, ds.x_test, ds.y_test)
    agree = float((predict_logits(surrogate, ds.x_test).argmax(1) == predict_logits(model, ds.x_test).argmax(1))
                  .float().mean())
    params_doc = {"victim_arch": served.arch, "labels": labels, "queries": result.queries, "answered": result.answered,
                  "epochs": result.epochs, "max_epochs": epochs, "until_accuracy": until_accuracy, "lr": lr,
                  "seed": seed, "data": data, "marked_api": served.mark,
                  **({"beta": served.answerer.beta} if served.mark == "tiebreak" else {})}
    modality = {} if text is None else {"modality": k.modality if k is not None else
                                        wmark_metadata(read_metadata(served.weights))["modality"]}
    save_model(surrogate, out, metadata=model_metadata(arch=arch, num_classes=ds.num_classes,
                                                       input_shape=ds.input_shape, test_accuracy=acc,
                                                       attack={"kind": "extract", **params_doc}, **modality))
    return {"out": str(out), "attack": "extract", "params": params_doc, "test_accuracy": acc,
            "victim_agreement": agree, "query_seconds": result.query_seconds, "train_seconds": result.train_seconds}


def inspect(*, path: PathLike) -> dict[str, Any]:
    """The ``wmark.*`` metadata of a model file (plus ``format``)."""
    raw = read_metadata(path)
    out = wmark_metadata(raw)
    if "format" in raw:
        out["format"] = raw["format"]
    return out
