"""The ``wmark`` command line: a thin click shell over :mod:`wmark.api`.

Exit codes: 0 detected / success, 1 not detected, 2 usage error (bad option, missing or corrupt file,
mismatched key), 3 runtime error (a suspect that fails or answers garbage), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from wmark import __version__, api, cli_common, cli_evidence
from wmark.cli_common import ARCH_HELP, DATA_HELP, EXIT_HELP, _emit, _handle_errors, _progress, check_outputs
from wmark.cli_verify import verify
from wmark.errors import UsageError
from wmark.io import check_output


def _shape(value: str) -> tuple[int, ...]:
    # Only parsing here: the library checks the sizes (a usage error, exit 2, like every bad value).
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {value!r} is not a comma-separated list of sizes, e.g. 1,28,28.") from None


@click.group(cls=cli_common.Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog=EXIT_HELP)
@click.version_option(__version__, prog_name="wmark")
def main() -> None:
    """Prove who owns a machine-learning model: keyed watermarks and exact hypothesis tests."""


@main.command(epilog=EXIT_HELP)
@click.option("--owner", required=True, help="Who claims the models this key marks.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Key file to write (mode 0600).")
@click.option("--classes", "num_classes", default=10, show_default=True, help="Number of model classes.")
@click.option("--input-shape", default="1,28,28", show_default=True, help="Shape of one input, C,H,W.")
@click.option("--triggers", "num_triggers", default=100, show_default=True, help="Trigger-set size.")
@click.option("--message", default=None,
              help="Owner message to write into the weight watermark (e.g. 'ACME Corp 2026'; public, committed).")
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
@click.option("--json", "as_json", is_flag=True, help="Print the public key description as JSON.")
@click.option("--modality", type=click.Choice(["image", "text"]), default="image", show_default=True,
              help="What the model takes: image tensors (--input-shape) or text (--tokenizer, --max-length).")
@click.option("--tokenizer", default=None,
              help="Text keys: the model's tokenizer, all-MiniLM-L6-v2 or a local tokenizer directory.")
@click.option("--max-length", default=64, show_default=True, help="Text keys: longest input in tokens.")
@_handle_errors
def keygen(owner: str, out: str, num_classes: int, input_shape: str, num_triggers: int, message: str | None,
           force: bool, as_json: bool, modality: str, tokenizer: str | None, max_length: int) -> None:
    """Make a secret key file and print its public commitment (publish it before release)."""
    if (modality == "text") != (tokenizer is not None):
        raise UsageError("A text key needs --tokenizer, and --tokenizer needs --modality text.")
    if modality == "text":
        cli_common.refuse(["input_shape"], "to a text key (its inputs are token sequences of at most --max-length)")
    else:
        cli_common.refuse(["max_length"], "to an image key (give --modality text for a text key)")
    check_output(out)  # not check_outputs: --force may replace a key
    info = api.keygen(owner=owner, out=out, num_classes=num_classes, input_shape=_shape(input_shape),
                      num_triggers=num_triggers, overwrite=force, message=message, tokenizer=tokenizer,
                      max_length=max_length)
    _emit(info, as_json, f"wrote {out} (mode 0600, keep it secret)\ncommitment: {info['commitment']}")


@main.command(epilog=EXIT_HELP)
@click.option("--arch", required=True, help=ARCH_HELP)
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write (.safetensors).")
@click.option("--epochs", default=3, show_default=True, help="Passes over the training data.")
@click.option("--seed", default=0, show_default=True, help="Seed of initialisation and data order.")
@click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--batch-size", default=64, show_default=True, help="Training samples per optimizer step.")
@click.option("--max-samples", type=int, default=None, help="Use only the first N training samples.")
@_handle_errors
def train(arch: str, data: str, out: str, epochs: int, seed: int, lr: float, batch_size: int,
          max_samples: int | None) -> None:
    """Train a model without a watermark (a base model, or an independent reference)."""
    check_outputs(out)
    info = api.train(arch=arch, data=data, out=out, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size,
                     max_samples=max_samples, progress=_progress())
    click.echo(f"wrote {out}: test accuracy {info['test_accuracy']:.4f} ({info['seconds']:.1f}s)")


@main.command(epilog=EXIT_HELP)
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="Owner key file.")
@click.option("--arch", required=True, help=ARCH_HELP)
@click.option("--weights", required=True, type=click.Path(dir_okay=False), help="Model to fine-tune.")
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Marked model to write.")
@click.option("--scheme", default="trigger", show_default=True, help="Comma-separated schemes to embed.")
@click.option("--epochs", default=4, show_default=True,
              help="Epochs of the fine-tune that embeds the mark (longer embedding survives a thief's fine-tune better).")
@click.option("--lr", default=5e-4, show_default=True, help="Adam learning rate.")
@click.option("--seed", default=0, show_default=True, help="Seed of the data order and the trigger batches.")
@click.option("--trigger-per-batch", type=int, default=None,
              help="Trigger samples per optimizer step. [default: 8 when mixing, else 4]")
@click.option("--max-samples", type=int, default=None, help="Use only the first N training samples.")
@click.option("--trigger-lookahead", type=float, default=None,
              help="Radius of the simulated fine-tune step the triggers are learnt past; 0 mixes them into the "
                   "batches unless a margin is given. [default: 0.05 for image keys, 0 for text keys]")
@click.option("--trigger-margin", type=float, default=None,
              help="A trigger whose label leads every other logit by this much adds no loss; without lookahead "
                   "the triggers then get their own pass instead of joining the batches. [default: none]")
@click.option("--trigger-mixing", is_flag=True, default=False,
              help="Mix the triggers into the training batches (no lookahead, no margin).")
@_handle_errors
def embed(key: str, arch: str, weights: str, data: str, out: str, scheme: str, epochs: int, lr: float, seed: int,
          trigger_per_batch: int | None, max_samples: int | None, trigger_lookahead: float | None,
          trigger_margin: float | None, trigger_mixing: bool) -> None:
    """Fine-tune a model with the key's watermark and write the marked model."""
    check_outputs(out)
    schemes = tuple(s.strip() for s in scheme.split(",") if s.strip())
    if not schemes:  # api.embed(schemes=()) is the unmarked baseline: never what `wmark embed` is asked for
        raise UsageError(f"--scheme {scheme!r} names no scheme; give trigger, weights or both, comma-separated.")
    info = api.embed(key=key, arch=arch, weights=weights, data=data, out=out, schemes=schemes, epochs=epochs,
                     lr=lr, seed=seed, trigger_per_batch=trigger_per_batch, max_samples=max_samples,
                     progress=_progress(), trigger_lookahead=trigger_lookahead, trigger_margin=trigger_margin,
                     trigger_mixing=trigger_mixing or None)
    click.echo(f"wrote {out}: test accuracy {info['test_accuracy']:.4f} ({info['seconds']:.1f}s)")


@main.command(epilog=EXIT_HELP)
@click.option("--name", required=True, help="Model name in URLs (/v2/models/NAME).")
@click.option("--arch", default=None, help=ARCH_HELP + " (with --mark tiebreak: only if the rule records none)")
@click.option("--weights", default=None, type=click.Path(dir_okay=False),
              help="Model file to serve (with --mark tiebreak: only if it moved since the rule was built).")
@click.option("--port", default=8080, show_default=True, help="TCP port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default).")
@click.option("--labels-only", is_flag=True, help="Answer only the top-1 label (INT64), like many paid APIs.")
@click.option("--token-env", default=None, help="Require the bearer token held in this environment variable.")
@click.option("--clients", "clients_file", default=None, type=click.Path(dir_okay=False),
              help="Per-client bearer tokens: a JSON object client name -> token (chmod 600); instead of --token-env.")
@click.option("--mark", type=click.Choice(["tiebreak", "flip"]), default=None,
              help="Mark the answers: tiebreak (keyed tie-breaking, with --rule) or flip (keyed wrong labels).")
@click.option("--key", default=None, type=click.Path(dir_okay=False), help="Owner key file (with --mark).")
@click.option("--rule", default=None, type=click.Path(dir_okay=False),
              help="tiebreak: the rule from `wmark tiebreak build` (it names the served model).")
@click.option("--beta", type=float, default=None, help="tiebreak: scale of the keyed log-probability shift (default: the rule's, 1.0 unless built with --max-cost).")
@click.option("--rate", type=float, default=None, help="flip: fraction of answers marked (default 0.03).")
@click.option("--candidates", default=None, help="flip: candidate-set size k or 'all' (default all).")
@click.option("--log", default=None, type=click.Path(dir_okay=False),
              help="Record each client's queries in this query log (SQLite) for `wmark verify extraction`.")
@click.option("--log-sync", type=click.Choice(["process", "fsync"]), default="process", show_default=True,
              help="process: logged rows survive a crash of the server, not of the OS; fsync: each request's rows "
                   "reach the disk before it is answered (slower).")
@click.option("--policy", default=None, type=click.Path(dir_okay=False),
              help="Per-client policy (JSON): quotas, rate limits, answer modes, alarm actions, whom --mark marks "
                   "(always or on-alarm); see docs/monitoring.md.")
@click.option("--monitor", default=None, type=click.Path(dir_okay=False),
              help="Watch clients for extraction with this profile from `wmark monitor calibrate`.")
@click.option("--alarm-log", default=None, type=click.Path(dir_okay=False),
              help="Append one JSON line per extraction alarm here.")
@click.option("--monitor-state", default=None, type=click.Path(dir_okay=False),
              help="Keep quota counts and alarms in this JSON file across restarts.")
@click.option("--device", default=None, help="Answer on this device: cpu, cuda, cuda:N or mps [default: CUDA when present].")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=None,
              help="Refuse a request body larger than this (HTTP 413, before it is read whole) [default: room for the "
                   "largest request the model answers: 1024 inputs of its size as JSON].")
@click.option("--body-timeout", type=click.FloatRange(min=0, min_open=True, max=86400), default=60.0,
              show_default=True, help="Seconds a client has to send a request's whole body (HTTP 408 past it): a "
                                      "client trickling a body holds a connection no longer.")
@click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True, max=86400), default=10.0,
              show_default=True, help="Seconds a connection has to send a request line and headers, from connecting "
                                      "or from a kept-alive request's first byte (HTTP 408 past it, and closed).")
@_handle_errors
def serve(name: str, arch: str | None, weights: str | None, port: int, host: str, labels_only: bool,
          token_env: str | None, clients_file: str | None, mark: str | None, key: str | None, rule: str | None,
          beta: float | None, rate: float | None, candidates: str | None, log: str | None, log_sync: str,
          policy: str | None,
          monitor: str | None, alarm_log: str | None, monitor_state: str | None, device: str | None,
          max_body_bytes: int | None, body_timeout: float, header_timeout: float) -> None:
    """Serve a model over the Open Inference Protocol v2 until interrupted, optionally behind an API mark."""
    from wmark.serve import serve as run_server

    if mark is None:
        cli_common.refuse(["key", "rule", "beta", "rate", "candidates", "log", "log_sync"], "without --mark")
    elif mark == "tiebreak":
        cli_common.refuse(["rate", "candidates"], "to --mark tiebreak")
    else:
        cli_common.refuse(["rule", "beta"], "to --mark flip")
    if log is None:
        cli_common.refuse(["log_sync"], "without --log")
    check_outputs(log, alarm_log, monitor_state)
    run_server(arch=arch, weights=weights, name=name, host=host, port=port, labels_only=labels_only,
               token_env=token_env, key=key, mark=mark, rule=rule, beta=beta, rate=rate, candidates=candidates,
               clients_file=clients_file, log=log, log_durability=log_sync, policy=policy, monitor=monitor, alarm_log=alarm_log,
               monitor_state=monitor_state, device=device, max_body_bytes=max_body_bytes, body_timeout=body_timeout,
               header_timeout=header_timeout, announce=lambda line: click.echo(line, err=True))


@main.group(epilog=EXIT_HELP)
def attack() -> None:
    """Attack a model file the way a thief would (for evaluation)."""


def _attack_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--out", required=True, type=click.Path(dir_okay=False), help="Attacked copy to write.")(fn)
    fn = click.option("--weights", required=True, type=click.Path(dir_okay=False), help="Model to attack.")(fn)
    fn = click.option("--arch", required=True, help=ARCH_HELP)(fn)
    return fn


def _report_attack(info: dict[str, Any]) -> None:
    acc = info["test_accuracy"]
    click.echo(f"wrote {info['out']} ({info['attack']})" + (f": test accuracy {acc:.4f}" if acc is not None else ""))


@attack.command("finetune", epilog=EXIT_HELP)
@_attack_options
@click.option("--data", required=True, help=DATA_HELP + " (the attacker's own data)")
@click.option("--epochs", default=5, show_default=True, help="Passes over the attacker's data.")
@click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--layers", type=click.Choice(["all", "last", "reinit-last"]), default="all", show_default=True,
              help="Train every layer, only the output layer, or every layer after re-initialising the output layer.")
@click.option("--seed", default=0, show_default=True, help="Seed of the data order.")
@click.option("--max-samples", type=int, default=None, help="Use only the first N training samples.")
@_handle_errors
def attack_finetune(arch: str, weights: str, out: str, data: str, epochs: int, lr: float, layers: str, seed: int,
                    max_samples: int | None) -> None:
    """Fine-tune the model on the attacker's data."""
    check_outputs(out)
    _report_attack(api.attack(kind="finetune", arch=arch, weights=weights, out=out, data=data, epochs=epochs,
                              lr=lr, layers=layers, seed=seed, max_samples=max_samples, progress=_progress()))


@attack.command("extract", epilog=EXIT_HELP)
@click.option("--victim-arch", default=None, help="Victim architecture: " + ARCH_HELP)
@click.option("--victim", default=None, type=click.Path(dir_okay=False),
              help="Victim model file (queried only; with --mark tiebreak, the rule's served model by default).")
@click.option("--arch", required=True, help="Surrogate architecture: " + ARCH_HELP)
@click.option("--labels", type=click.Choice(["hard", "soft", "top1"]), default="hard", show_default=True,
              help="What the victim answers: top-1 label, all probabilities, or top-1 with rounded confidence.")
@click.option("--queries", default=10_000, show_default=True, help="Query budget.")
@click.option("--data", required=True, help=DATA_HELP + " (the attacker's query inputs, e.g. fashion-mnist@attacker)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Surrogate to write.")
@click.option("--epochs", default=6, show_default=True, help="Passes over the victim's answers.")
@click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--seed", default=0, show_default=True, help="Seed of the queries chosen, the surrogate's initialisation and data order.")
@click.option("--mark", type=click.Choice(["tiebreak", "flip"]), default=None,
              help="Serve the victim behind the owner's marked API (simulates the real path).")
@click.option("--key", default=None, type=click.Path(dir_okay=False), help="Owner key file (with --mark).")
@click.option("--rule", default=None, type=click.Path(dir_okay=False), help="tiebreak: the rule the API serves with.")
@click.option("--log", default=None, type=click.Path(dir_okay=False), help="Query log the marked API records in.")
@click.option("--client", default="attacker", show_default=True, help="Client name the marked API logs under.")
@click.option("--rate", type=float, default=None, help="flip: fraction of answers marked (default 0.03).")
@click.option("--candidates", default=None, help="flip: candidate-set size k or 'all' (default all).")
@click.option("--beta", type=float, default=None, help="tiebreak: scale of the keyed log-probability shift (default: the rule's, 1.0 unless built with --max-cost).")
@click.option("--until-accuracy", type=float, default=None,
              help="Stop after the first epoch whose accuracy on the data's test split reaches this (--epochs is the cap).")
@_handle_errors
def attack_extract(victim_arch: str | None, victim: str | None, arch: str, labels: str, queries: int, data: str,
                   out: str, epochs: int, lr: float, seed: int, mark: str | None, key: str | None, rule: str | None,
                   log: str | None, client: str, rate: float | None, candidates: str | None, beta: float | None,
                   until_accuracy: float | None) -> None:
    """Train a surrogate on the victim's answers to the attacker's own inputs (model extraction)."""

    if mark is None:
        cli_common.refuse(["key", "rule", "log", "client", "rate", "candidates", "beta"], "without --mark")
    elif mark == "tiebreak":
        cli_common.refuse(["rate", "candidates"], "to --mark tiebreak")
    else:
        cli_common.refuse(["rule", "beta"], "to --mark flip")
    check_outputs(out, log)
    info = api.extract(victim_arch=victim_arch, victim=victim, arch=arch, data=data, out=out, labels=labels,
                       queries=queries, epochs=epochs, lr=lr, seed=seed, key=key, mark=mark, rule=rule, log=log,
                       client=client, rate=rate, candidates=candidates, beta=beta, until_accuracy=until_accuracy,
                       progress=_progress())
    click.echo(f"wrote {info['out']} (extract, {labels} labels, {info['params']['answered']} answers, "
               f"{info['params']['epochs']} epoch(s)): test accuracy {info['test_accuracy']:.4f}, agreement with the "
               f"victim {info['victim_agreement']:.4f}")


@attack.command("prune", epilog=EXIT_HELP)
@_attack_options
@click.option("--sparsity", default=0.5, show_default=True, help="Fraction of weights zeroed (global magnitude).")
@click.option("--data", default=None, help="Optional test data to report accuracy on.")
@_handle_errors
def attack_prune(arch: str, weights: str, out: str, sparsity: float, data: str | None) -> None:
    """Zero the smallest weights globally."""
    check_outputs(out)
    _report_attack(api.attack(kind="prune", arch=arch, weights=weights, out=out, sparsity=sparsity, data=data))


@attack.command("quantize", epilog=EXIT_HELP)
@_attack_options
@click.option("--bits", default=8, show_default=True, help="Bits per weight (symmetric, per output channel).")
@click.option("--data", default=None, help="Optional test data to report accuracy on.")
@_handle_errors
def attack_quantize(arch: str, weights: str, out: str, bits: int, data: str | None) -> None:
    """Quantize weights (stored de-quantized, loadable by the same architecture)."""
    check_outputs(out)
    _report_attack(api.attack(kind="quantize", arch=arch, weights=weights, out=out, bits=bits, data=data))


@attack.command("noise", epilog=EXIT_HELP)
@_attack_options
@click.option("--std", default=0.1, show_default=True, help="Noise std relative to each weight tensor's RMS.")
@click.option("--seed", default=0, show_default=True, help="Seed of the noise.")
@click.option("--data", default=None, help="Optional test data to report accuracy on.")
@_handle_errors
def attack_noise(arch: str, weights: str, out: str, std: float, seed: int, data: str | None) -> None:
    """Add Gaussian noise to every conv/linear weight."""
    check_outputs(out)
    _report_attack(api.attack(kind="noise", arch=arch, weights=weights, out=out, std=std, seed=seed, data=data))


@attack.command("permute", epilog=EXIT_HELP)
@_attack_options
@click.option("--seed", default=0, show_default=True, help="Seed of the permutation and the scales.")
@click.option("--data", default=None, help="Optional test data to report accuracy on.")
@_handle_errors
def attack_permute(arch: str, weights: str, out: str, seed: int, data: str | None) -> None:
    """Permute and positively rescale every hidden neuron (predictions unchanged)."""
    check_outputs(out)
    _report_attack(api.attack(kind="permute", arch=arch, weights=weights, out=out, seed=seed, data=data))


@attack.command("rename", epilog=EXIT_HELP)
@_attack_options
@click.option("--seed", default=0, show_default=True, help="Seed of the new names.")
@click.option("--data", default=None, help="Optional test data to report accuracy on.")
@_handle_errors
def attack_rename(arch: str, weights: str, out: str, seed: int, data: str | None) -> None:
    """Scramble every tensor name (the copy no longer loads by name; white-box verification still reads it)."""
    check_outputs(out)
    _report_attack(api.attack(kind="rename", arch=arch, weights=weights, out=out, seed=seed, data=data))


@main.group(epilog=EXIT_HELP)
def tiebreak() -> None:
    """Keyed tie-breaking, an API-side mark that extraction carries over (see wmark.schemes.tiebreak)."""


@tiebreak.command("build", epilog=EXIT_HELP)
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="Key file.")
@click.option("--arch", required=True, help="Architecture of the served model: " + ARCH_HELP)
@click.option("--weights", required=True, type=click.Path(dir_okay=False), help="The served model file.")
@click.option("--data", required=True, help=DATA_HELP + " (the owner's own inputs, e.g. fashion-mnist@owner)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Rule file to write (.safetensors).")
@click.option("--components", type=int, default=None, help="Principal feature directions kept (default 64, at most the live ones).")
@click.option("--skip-leading", "skip", type=int, default=0, show_default=True,
              help="Largest-variance feature directions left out before the kept components.")
@click.option("--references", default=None,
              help="Architectures of the reference surrogates (distilled from the unmarked served model) that pick "
                   "the verification inputs, comma-separated, or 'none' for the served model's nearest ties "
                   "(default: --arch and fmnist-mlp; text-bow for a text key, whose rule commits texts).")
@click.option("--reference-repeats", type=int, default=None,
              help="Reference surrogates per architecture and recipe, each from its own seed (default 4; 1 for a "
                   "text key).")
@click.option("--verify-count", type=int, default=1000, show_default=True,
              help="Verification inputs committed in the rule (the most a verification asks).")
@click.option("--max-samples", type=int, default=None, help="Use only the first N of the owner's inputs.")
@click.option("--device", default=None,
              help="Run the served model and train the references on this device: cpu, cuda, cuda:N or mps "
                   "[default: CUDA when present].")
@click.option("--max-cost", type=float, default=None,
              help="Accuracy points honest clients may lose: the rule records the largest scale of the mark (up to "
                   "1.0, or 1.5 with --features public) within it with 90 % confidence on the data's test split, and "
                   "`wmark serve` serves that scale.")
@click.option("--features", type=click.Choice(["served", "public"]), default="served", show_default=True,
              help="Feature map the keyed shift is read from: the served model's own, or the public all-MiniLM-L6-v2 "
                   "encoder's (text keys over its tokenizer, a served model fine-tuned from it: at the same --max-cost, "
                   "stronger evidence on average but no more thieves caught; a second encoder forward per request).")
@_handle_errors
def tiebreak_build(key: str, arch: str, weights: str, data: str, out: str, components: int | None,
                   skip: int, references: str | None, reference_repeats: int | None, verify_count: int,
                   max_samples: int | None, device: str | None, max_cost: float | None, features: str) -> None:
    """Build the tie-break rule that `wmark serve --mark tiebreak` serves with and `wmark verify extraction` tests.

    The file holds the key-independent feature map, the owner's verification inputs (committed before any
    suspect exists) and the served model's architecture, path and digest; the keyed directions are re-derived
    from the key, never stored.
    """
    check_outputs(out)
    refs = None if references is None else [a.strip() for a in references.split(",") if a.strip() not in ("", "none")]
    info = api.build_tiebreak(key=key, arch=arch, weights=weights, data=data, out=out, components=components,
                              skip=skip, references=refs, verify_count=verify_count,
                              reference_repeats=reference_repeats, max_samples=max_samples, device=device,
                              max_cost=max_cost, features=features)
    skipped = f" after the leading {info['skipped']}" if info["skipped"] else ""
    space = "" if features == "served" else f" of {info['feature_space']}"
    click.echo(f"wrote {info['out']} ({info['components']} components{space}{skipped} from {info['inputs']} inputs; "
               f"{info['verification_inputs']} verification inputs chosen by {info['verification']}; "
               f"{info['seconds']:.1f} s)")
    cost = info["honest_cost"]
    if cost is None:
        return
    chosen = "" if max_cost is None else (f" (the largest scale within {max_cost:g} points with "
                                          f"{100 * cost['confidence']:g} % confidence; the default 1.0 costs "
                                          f"{cost['default_cost_pp']:.2f})")
    click.echo(f"served at beta {cost['beta']:g}{chosen}, this key changes {100 * cost['changed_fraction']:.1f} % of "
               f"the answers on the {cost['test_inputs']} test inputs and costs honest clients "
               f"{cost['accuracy_cost_pp']:.2f} ± {cost['cost_se_pp']:.2f} accuracy points "
               f"({100 * cost['served_accuracy']:.2f} % -> {100 * cost['api_accuracy']:.2f} %); a lower scale (`serve "
               "--beta`, or `--max-cost` here) costs less and catches fewer thieves")


@main.group(epilog=EXIT_HELP)
def monitor() -> None:
    """Watch the owner's own API for extraction (see `wmark serve --policy/--monitor`)."""


@monitor.command("calibrate", epilog=EXIT_HELP)
@click.option("--arch", required=True, help="Architecture of the served model: " + ARCH_HELP)
@click.option("--weights", required=True, type=click.Path(dir_okay=False), help="The served model file.")
@click.option("--data", required=True,
              help=DATA_HELP + " (the owner's natural inputs, or texts for a text model; fits the feature space)")
@click.option("--streams", required=True, type=click.Path(dir_okay=False),
              help="Honest streams: .safetensors with x (inputs in arrival order) and stream (id per input); for "
                   "a text model, JSON Lines of {\"stream\": id, \"text\": \"...\"} in arrival order.")
@click.option("--target-rate", type=float, default=0.01, show_default=True,
              help="Wanted chance that an honest stream as long as these ever alarms.")
@click.option("--dim", type=int, default=32, show_default=True, help="Reduced feature dimension.")
@click.option("--signals", default=None,
              help="Signals that vote in the alarm, comma-separated (default all: prada,near_dup,ood,coverage,near_tie).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Profile file to write (.safetensors).")
@click.option("--device", default=None,
              help="The served model answers the streams on this device: cpu, cuda, cuda:N or mps [default: CUDA "
                   "when present].")
@_handle_errors
def monitor_calibrate(arch: str, weights: str, data: str, streams: str, target_rate: float, dim: int,
                      signals: str | None, out: str, device: str | None) -> None:
    """Calibrate the extraction monitor's alarm on honest traffic and write its profile."""
    from wmark.monitor.api import calibrate_profile

    check_outputs(out)
    chosen = None if signals is None else [s.strip() for s in signals.split(",") if s.strip()]
    info = calibrate_profile(arch=arch, weights=weights, data=data, streams=streams, out=out,
                             target_rate=target_rate, dim=dim, signals=chosen, device=device)
    click.echo(f"wrote {info['out']} (threshold {info['threshold']:.3f} from {info['streams']} honest streams, "
               f"{info['queries']} queries; false-alarm bound {info['false_alarm_bound']:.3g} per stream)")


@monitor.command("report", epilog=EXIT_HELP)
@click.option("--alarm-log", required=True, type=click.Path(dir_okay=False), help="The server's alarm log.")
@click.option("--state", default=None, type=click.Path(dir_okay=False), help="The server's --monitor-state file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_handle_errors
def monitor_report(alarm_log: str, state: str | None, as_json: bool) -> None:
    """Summarise clients: alarms (first one, signals, action) and, with --state, queries and refusals."""
    from wmark.monitor.api import monitor_report as summarise

    doc = summarise(alarm_log=alarm_log, state=state)
    lines = [f"{doc['alarms']} alarms, {len(doc['clients'])} clients"]
    for name, c in doc["clients"].items():
        first = c.get("first_alarm")
        line = f"  {name}: " + (f"ALARM at {first['queries']} queries (score {first['score']} > "
                                f"{first['threshold']}, action {first['action']}, {first['time']})"
                                if first else "no alarm")
        if "queries_total" in c:
            refused = ", ".join(f"{k} {v}" for k, v in sorted((c.get("refusals") or {}).items())) or "none"
            line += f"; {c['queries_total']} queries, {c['requests']} requests, refused: {refused}"
        lines.append(line)
    _emit(doc, as_json, "\n".join(lines))


@main.command(epilog=EXIT_HELP)
@click.argument("path", type=click.Path(exists=True))
@click.option("--signer-key", default=None, type=click.Path(dir_okay=False),
              help="Check the signature next to the file (PATH.sig) against this public key (PEM).")
@_handle_errors
def inspect(path: str, signer_key: str | None) -> None:
    """Show a model file's wmark.* metadata and whether it is signed, and by whom."""

    from wmark import signing

    out = api.inspect(path=path) if _is_safetensors(Path(path)) else {}
    if signer_key is not None:
        out["signature"] = signing.verify_file(path=path, public_key=signer_key).to_dict()
    else:
        out["signature"] = signing.describe_signature(path=path) or "unsigned (no " + str(signing.signature_path(path)) + ")"
    click.echo(json.dumps(out, indent=2, sort_keys=True))


def _is_safetensors(path: Path) -> bool:
    """Named ``.safetensors``, or laid out as one (a length, then a JSON header): a model saved as ``m.st`` has
    metadata to show too, and a corrupt ``.safetensors`` file must be called corrupt, not shown as unmarked."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".safetensors":
        return True
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False  # unreadable: the signature check below says so
    return len(head) == 9 and head[8:] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


main.add_command(verify)
cli_evidence.register(main, _handle_errors)

if __name__ == "__main__":
    main()
