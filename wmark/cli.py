"""The ``wmark`` command line: a thin click shell over :mod:`wmark.api`.

Exit codes: 0 detected / success, 1 not detected, 2 usage error (bad option, missing or corrupt file,
mismatched key), 3 runtime error (a suspect that fails or answers garbage).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from wmark import __version__, api
from wmark.errors import UsageError, WmarkError

EXIT_HELP = """\b
Exit codes:
  0  detected (verify) or success
  1  not detected (verify)
  2  usage error: bad option, missing/corrupt file, mismatched key
  3  runtime error: the suspect failed or answered garbage"""


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except WmarkError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(3)
        except Exception as exc:
            if os.environ.get("WMARK_DEBUG"):
                raise
            click.echo(f"error: unexpected {type(exc).__name__}: {exc} (set WMARK_DEBUG=1 for a traceback)", err=True)
            sys.exit(3)

    return wrapper


def _shape(value: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of sizes, e.g. 1,28,28") from None
    if not shape or any(s <= 0 for s in shape):
        raise click.BadParameter("sizes must be positive")
    return shape


def _emit(doc: dict[str, Any], as_json: bool, summary: str) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else summary)


def _progress() -> bool:
    return sys.stderr.isatty() or bool(os.environ.get("WMARK_PROGRESS"))


ARCH_HELP = ("built-in name (fmnist-cnn, fmnist-cnn-wide, fmnist-mlp; text: minilm-classifier, tiny-bert, text-bow) "
             "or package.module:factory")
DATA_HELP = "fashion-mnist[:DIR], digits, fortunes[:DIR][@owner|@attacker], or a .safetensors file with tensors x and y"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
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
    info = api.keygen(owner=owner, out=out, num_classes=num_classes, input_shape=_shape(input_shape),
                      num_triggers=num_triggers, overwrite=force, message=message, tokenizer=tokenizer,
                      max_length=max_length)
    _emit(info, as_json, f"wrote {out} (mode 0600, keep it secret)\ncommitment: {info['commitment']}")


@main.command(epilog=EXIT_HELP)
@click.option("--arch", required=True, help=ARCH_HELP)
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write (.safetensors).")
@click.option("--epochs", default=3, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed of initialisation and data order.")
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--max-samples", type=int, default=None, help="Use only the first N training samples.")
@_handle_errors
def train(arch: str, data: str, out: str, epochs: int, seed: int, lr: float, batch_size: int,
          max_samples: int | None) -> None:
    """Train a model without a watermark (a base model, or an independent reference)."""
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
@click.option("--epochs", default=2, show_default=True)
@click.option("--lr", default=5e-4, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--trigger-per-batch", default=8, show_default=True, help="Trigger samples mixed into each batch.")
@click.option("--max-samples", type=int, default=None, help="Use only the first N training samples.")
@_handle_errors
def embed(key: str, arch: str, weights: str, data: str, out: str, scheme: str, epochs: int, lr: float, seed: int,
          trigger_per_batch: int, max_samples: int | None) -> None:
    """Fine-tune a model with the key's watermark and write the marked model."""
    schemes = tuple(s.strip() for s in scheme.split(",") if s.strip())
    info = api.embed(key=key, arch=arch, weights=weights, data=data, out=out, schemes=schemes, epochs=epochs,
                     lr=lr, seed=seed, trigger_per_batch=trigger_per_batch, max_samples=max_samples,
                     progress=_progress())
    click.echo(f"wrote {out}: test accuracy {info['test_accuracy']:.4f} ({info['seconds']:.1f}s)")


def _remote_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options of ``verify`` for a suspect reached over HTTP (see wmark.remote.verify_remote)."""
    options = [
        click.option("--protocol", type=click.Choice(["v2", "tfserving", "json"]), default="v2", show_default=True,
                     help="HTTP suspect: Open Inference Protocol v2, TensorFlow Serving REST, or a JSON template."),
        click.option("--model-name", default=None, help="HTTP suspect: model name on a v2/TF Serving server."),
        click.option("--template", default=None, help="json protocol: torchserve, hf, or a template file."),
        click.option("--token-env", default=None, help="HTTP suspect: environment variable holding a bearer token."),
        click.option("--token-file", default=None, type=click.Path(dir_okay=False),
                     help="HTTP suspect: file holding a bearer token."),
        click.option("--rate", type=float, default=None, help="HTTP suspect: most requests per second."),
        click.option("--timeout", type=float, default=10.0, show_default=True, help="HTTP suspect: seconds per answer."),
        click.option("--retries", type=int, default=3, show_default=True,
                     help="HTTP suspect: retries (backoff with jitter, honouring Retry-After)."),
        click.option("--concurrency", type=int, default=1, show_default=True,
                     help="HTTP suspect: requests in flight at once."),
        click.option("--transcript", default=None, type=click.Path(dir_okay=False),
                     help="HTTP suspect: SQLite transcript; re-running the same command resumes from it."),
        click.option("--transcript-sync", type=click.Choice(["fsync", "process"]), default="fsync",
                     show_default=True,
                     help="fsync: each answer reaches the disk; process: survives kill -9, not an OS crash (faster)."),
        click.option("--cover-data", default=None, help="HTTP suspect: dataset whose inputs serve as cover traffic."),
        click.option("--cover-ratio", type=float, default=1.0, show_default=True,
                     help="HTTP suspect: mean cover queries per trigger query."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command(epilog=EXIT_HELP)
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="Owner key file.")
@click.option("--arch", default=None, help=ARCH_HELP + " (model-file suspects)")
@click.option("--suspect", required=True,
              help="Suspect model file (.safetensors) or prediction API URL (http://host:port/...).")
@click.option("--alpha", default=1e-6, show_default=True, help="Bound on the false-accusation probability.")
@click.option("--mode", type=click.Choice(["sequential", "fixed", "whitebox"]), default="sequential",
              show_default=True,
              help="sequential: stop once the evidence suffices (anytime-valid); fixed: ask the whole budget; "
                   "whitebox: read the suspect file's weights (needs --reference, not --arch).")
@click.option("--reference", default=None, type=click.Path(dir_okay=False),
              help="whitebox: the owner's marked model (written by `wmark embed --scheme weights`).")
@click.option("--anchor", default=None, type=click.Path(dir_okay=False),
              help="whitebox (recommended): the unmarked base model the reference was fine-tuned from; aligning "
                   "to it makes the null exact by construction.")
@click.option("--max-queries", type=int, default=None, help="Query budget (default: every trigger).")
@click.option("--with-scores", is_flag=True, help="Let the verifier see scores, not only labels.")
@click.option("--api-log", default=None, type=click.Path(dir_okay=False),
              help="Extraction test: the SQLite log of the owner's marked API (model-file suspects).")
@click.option("--client", default=None,
              help="Extraction tests: the API client whose queries to replay (with --api-log or --tiebreak-log).")
@click.option("--api-max-queries", type=int, default=300, show_default=True,
              help="Extraction test: most logged queries to ask.")
@click.option("--tiebreak", default=None, type=click.Path(dir_okay=False),
              help="Tie-break test: the rule file written by `wmark tiebreak build` (model files and APIs).")
@click.option("--served", default=None, type=click.Path(dir_okay=False),
              help="Tie-break test: the owner's served model file the rule was built from.")
@click.option("--served-arch", default=None, help="Tie-break test: architecture of --served (default: --arch).")
@click.option("--holdout", default=None,
              help="Tie-break test, only for a rule that commits no verification inputs: the owner's own inputs, "
                   "never a client's (" + DATA_HELP + ").")
@click.option("--tiebreak-queries", type=int, default=1000, show_default=True,
              help="Tie-break test: verification inputs asked (the first of the rule's ranking), fixed before querying; "
                   "0 with --tiebreak-log: only the client's queries.")
@click.option("--tiebreak-log", default=None, type=click.Path(dir_okay=False),
              help="Tie-break test on a client's own queries: the log the tie-break API wrote (with --client; "
                   "assumes the client did not pick its queries by the answers).")
@click.option("--log-queries", type=int, default=1000, show_default=True,
              help="Tie-break log test: the client's logged inputs asked, fixed before querying.")
@click.option("--log-rounds", type=int, default=21, show_default=True,
              help="Tie-break log test: rounds to ask them in (the first by the references' ranking, the later "
                   "ones where the suspect's earlier answers put it closest to a tie); 1: the ranking alone.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as one JSON document.")
@click.option("--report", default=None, type=click.Path(dir_okay=False),
              help="Write an evidence report (HTML, with a .json twin).")
@_remote_options
@_handle_errors
def verify(key: str, arch: str | None, suspect: str, alpha: float, mode: str, reference: str | None,
           anchor: str | None, max_queries: int | None, with_scores: bool, api_log: str | None, client: str | None,
           api_max_queries: int, tiebreak: str | None, served: str | None, served_arch: str | None,
           holdout: str | None, tiebreak_queries: int, tiebreak_log: str | None, log_queries: int, log_rounds: int,
           as_json: bool, report: str | None, **remote: Any) -> None:
    """Test a suspect for the key's watermark; exit 0 if detected, 1 if not.

    Black-box (default) queries the key's triggers; --mode whitebox reads the suspect's weights.
    """
    if api_log is not None and (mode == "whitebox" or suspect.startswith(("http://", "https://"))):
        raise UsageError("--api-log works with a model-file suspect in sequential or fixed mode; for an HTTP "
                         "suspect, run the extraction test from Python (wmark.schemes.api_mark.api_mark_test).")
    if (tiebreak is not None or tiebreak_log is not None) and mode == "whitebox":
        raise UsageError("--tiebreak and --tiebreak-log are black-box tests; use --mode sequential or fixed.")
    if mode == "whitebox":
        if reference is None:
            raise UsageError("--mode whitebox needs --reference (the owner's marked model file).")
        if suspect.startswith(("http://", "https://")):
            raise UsageError("--mode whitebox reads a suspect's weight file; pass a .safetensors path, not a URL.")
        verdict = api.verify_whitebox(key=key, reference=reference, suspect=suspect, alpha=alpha, anchor=anchor)
        if anchor is None:
            click.echo("note: aligned to the marked reference (null checked empirically); pass --anchor with the "
                       "base model it was fine-tuned from for a null exact by construction.", err=True)
        if report is not None:
            api.write_report(verdict=verdict, key=key, path=report)
    elif suspect.startswith(("http://", "https://")):
        verdict = api.verify_remote(key=key, url=suspect, alpha=alpha, mode=mode,  # type: ignore[arg-type]
                                    max_queries=max_queries, report=report, tiebreak=tiebreak, served=served,
                                    served_arch=served_arch or arch, holdout=holdout,
                                    tiebreak_queries=tiebreak_queries, tiebreak_log=tiebreak_log, client=client,
                                    log_queries=log_queries, log_rounds=log_rounds, progress=_progress(), **remote)
    else:
        if arch is None:
            raise UsageError("A model-file suspect needs --arch (the architecture its weights fit).")
        verdict = api.verify(key=key, arch=arch, suspect=suspect, alpha=alpha, mode=mode,  # type: ignore[arg-type]
                             max_queries=max_queries, labels_only=not with_scores, api_log=api_log,
                             client=client, api_max_queries=api_max_queries, tiebreak=tiebreak, served=served,
                             served_arch=served_arch, holdout=holdout, tiebreak_queries=tiebreak_queries,
                             tiebreak_log=tiebreak_log, log_queries=log_queries, log_rounds=log_rounds,
                             progress=_progress())
        if report is not None:
            api.write_report(verdict=verdict, key=key, path=report)
    doc = verdict.to_dict()
    unit = "bits" if mode == "whitebox" else "queries"
    summary = (f"{doc['decision']} ({doc['kind']}): log10 p = {doc['log10_p']:.2f} at alpha = {alpha:g}, "
               f"{doc['matches']} matches in {doc['queries']} {unit}")
    if doc["message"]:
        summary += f"\n{doc['message']}"
    _emit(doc, as_json, summary)
    sys.exit(0 if verdict.detected else 1)


@main.command(epilog=EXIT_HELP)
@click.option("--arch", required=True, help=ARCH_HELP)
@click.option("--weights", required=True, type=click.Path(dir_okay=False), help="Model file to serve.")
@click.option("--name", required=True, help="Model name in URLs (/v2/models/NAME).")
@click.option("--port", default=8080, show_default=True, help="TCP port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default).")
@click.option("--labels-only", is_flag=True, help="Answer only the top-1 label (INT64), like many paid APIs.")
@click.option("--token-env", default=None, help="Require the bearer token held in this environment variable.")
@click.option("--api-key", default=None, type=click.Path(dir_okay=False),
              help="Mark the answers with this key's tie-break rule (with --tiebreak).")
@click.option("--tiebreak", default=None, type=click.Path(dir_okay=False),
              help="Tie-break rule built for this model file by `wmark tiebreak build` (with --api-key).")
@click.option("--beta", type=float, default=None, help="Scale of the keyed log-probability shift (default 1.0).")
@click.option("--clients", "clients_file", default=None, type=click.Path(dir_okay=False),
              help="Per-client bearer tokens: a JSON object client name -> token (chmod 600); instead of --token-env.")
@click.option("--tiebreak-log", default=None, type=click.Path(dir_okay=False),
              help="Record each client's near-tie inputs here (SQLite) for `wmark verify --tiebreak-log`.")
@_handle_errors
def serve(arch: str, weights: str, name: str, port: int, host: str, labels_only: bool, token_env: str | None,
          api_key: str | None, tiebreak: str | None, beta: float | None, clients_file: str | None,
          tiebreak_log: str | None) -> None:
    """Serve a model over the Open Inference Protocol v2 until interrupted."""
    from wmark.serve import serve as run_server

    run_server(arch=arch, weights=weights, name=name, host=host, port=port, labels_only=labels_only,
               token_env=token_env, api_key=api_key, tiebreak=tiebreak, beta=beta, clients_file=clients_file,
               tiebreak_log=tiebreak_log, announce=lambda line: click.echo(line, err=True))


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
@click.option("--epochs", default=5, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--layers", type=click.Choice(["all", "last", "reinit-last"]), default="all", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--max-samples", type=int, default=None, help="Use only the first N training samples.")
@_handle_errors
def attack_finetune(arch: str, weights: str, out: str, data: str, epochs: int, lr: float, layers: str, seed: int,
                    max_samples: int | None) -> None:
    """Fine-tune the model on the attacker's data."""
    _report_attack(api.attack(kind="finetune", arch=arch, weights=weights, out=out, data=data, epochs=epochs,
                              lr=lr, layers=layers, seed=seed, max_samples=max_samples, progress=_progress()))


@attack.command("extract", epilog=EXIT_HELP)
@click.option("--victim-arch", required=True, help="Victim architecture: " + ARCH_HELP)
@click.option("--victim", required=True, type=click.Path(dir_okay=False), help="Victim model file (queried only).")
@click.option("--arch", required=True, help="Surrogate architecture: " + ARCH_HELP)
@click.option("--labels", type=click.Choice(["hard", "soft", "top1"]), default="hard", show_default=True,
              help="What the victim answers: top-1 label, all probabilities, or top-1 with rounded confidence.")
@click.option("--queries", default=10_000, show_default=True, help="Query budget.")
@click.option("--data", required=True, help=DATA_HELP + " (the attacker's query inputs, e.g. fashion-mnist@attacker)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Surrogate to write.")
@click.option("--epochs", default=6, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--api-key", default=None, type=click.Path(dir_okay=False),
              help="Serve the victim behind the owner's marked API with this key (simulates the real path).")
@click.option("--api-log", default=None, type=click.Path(dir_okay=False),
              help="SQLite log the marked API records queries in (the API-mark's marked ones, or with --tiebreak "
                   "the near-tie ones).")
@click.option("--client", default="attacker", show_default=True, help="Client id the marked API logs under.")
@click.option("--rate", type=float, default=None, help="Marked API: fraction of answers marked (default 0.03).")
@click.option("--candidates", default=None, help="Marked API: candidate-set size k or 'all' (default all).")
@click.option("--tiebreak", default=None, type=click.Path(dir_okay=False),
              help="Serve the victim behind the keyed tie-break wrapper with this rule (needs --api-key).")
@click.option("--beta", type=float, default=None, help="Tie-break wrapper: scale of the keyed log-probability shift (default 1.0).")
@click.option("--until-accuracy", type=float, default=None,
              help="Stop after the first epoch whose accuracy on the data's test split reaches this (--epochs is the cap).")
@_handle_errors
def attack_extract(victim_arch: str, victim: str, arch: str, labels: str, queries: int, data: str, out: str,
                   epochs: int, lr: float, seed: int, api_key: str | None, api_log: str | None, client: str,
                   rate: float | None, candidates: str | None, tiebreak: str | None, beta: float | None,
                   until_accuracy: float | None) -> None:
    """Train a surrogate on the victim's answers to the attacker's own inputs (model extraction)."""
    info = api.extract(victim_arch=victim_arch, victim=victim, arch=arch, data=data, out=out, labels=labels,
                       queries=queries, epochs=epochs, lr=lr, seed=seed, api_key=api_key, api_log=api_log,
                       client=client, rate=rate, candidates=candidates, tiebreak=tiebreak, beta=beta,
                       until_accuracy=until_accuracy, progress=_progress())
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
    _report_attack(api.attack(kind="prune", arch=arch, weights=weights, out=out, sparsity=sparsity, data=data))


@attack.command("quantize", epilog=EXIT_HELP)
@_attack_options
@click.option("--bits", default=8, show_default=True, help="Bits per weight (symmetric, per output channel).")
@click.option("--data", default=None, help="Optional test data to report accuracy on.")
@_handle_errors
def attack_quantize(arch: str, weights: str, out: str, bits: int, data: str | None) -> None:
    """Quantize weights (stored de-quantized, loadable by the same architecture)."""
    _report_attack(api.attack(kind="quantize", arch=arch, weights=weights, out=out, bits=bits, data=data))


@attack.command("noise", epilog=EXIT_HELP)
@_attack_options
@click.option("--std", default=0.1, show_default=True, help="Noise std relative to each weight tensor's RMS.")
@click.option("--seed", default=0, show_default=True)
@click.option("--data", default=None, help="Optional test data to report accuracy on.")
@_handle_errors
def attack_noise(arch: str, weights: str, out: str, std: float, seed: int, data: str | None) -> None:
    """Add Gaussian noise to every conv/linear weight."""
    _report_attack(api.attack(kind="noise", arch=arch, weights=weights, out=out, std=std, seed=seed, data=data))


@attack.command("permute", epilog=EXIT_HELP)
@_attack_options
@click.option("--seed", default=0, show_default=True)
@click.option("--data", default=None, help="Optional test data to report accuracy on.")
@_handle_errors
def attack_permute(arch: str, weights: str, out: str, seed: int, data: str | None) -> None:
    """Permute and positively rescale every hidden neuron (predictions unchanged)."""
    _report_attack(api.attack(kind="permute", arch=arch, weights=weights, out=out, seed=seed, data=data))


@attack.command("rename", epilog=EXIT_HELP)
@_attack_options
@click.option("--seed", default=0, show_default=True)
@click.option("--data", default=None, help="Optional test data to report accuracy on.")
@_handle_errors
def attack_rename(arch: str, weights: str, out: str, seed: int, data: str | None) -> None:
    """Scramble every tensor name (the copy no longer loads by name; white-box verification still reads it)."""
    _report_attack(api.attack(kind="rename", arch=arch, weights=weights, out=out, seed=seed, data=data))


@main.group(epilog=EXIT_HELP)
def tiebreak() -> None:
    """Keyed tie-breaking, an API-side mark that extraction carries over (see wmark.schemes.api_tiebreak)."""


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
                   "(default: --arch and fmnist-mlp).")
@click.option("--reference-repeats", type=int, default=None,
              help="Reference surrogates per architecture and recipe, each from its own seed (default 2).")
@click.option("--verify-count", type=int, default=1000, show_default=True,
              help="Verification inputs committed in the rule (the most a verification asks).")
@_handle_errors
def tiebreak_build(key: str, arch: str, weights: str, data: str, out: str, components: int | None,
                   skip: int, references: str | None, reference_repeats: int | None, verify_count: int) -> None:
    """Build the tie-break rule the marked API serves with and `wmark verify --tiebreak` tests.

    The file holds the key-independent feature map and the owner's verification inputs, committed before any
    suspect exists; the keyed directions are re-derived from the key, never stored.
    """
    refs = None if references is None else [a.strip() for a in references.split(",") if a.strip() not in ("", "none")]
    info = api.build_tiebreak(key=key, arch=arch, weights=weights, data=data, out=out, components=components,
                              skip=skip, references=refs, verify_count=verify_count,
                              reference_repeats=reference_repeats)
    skipped = f" after the leading {info['skipped']}" if info["skipped"] else ""
    click.echo(f"wrote {info['out']} ({info['components']} components{skipped} from {info['inputs']} inputs; "
               f"{info['verification_inputs']} verification inputs chosen by {info['verification']}; "
               f"{info['seconds']:.1f} s)")


@main.command(epilog=EXIT_HELP)
@click.argument("path", type=click.Path(dir_okay=False))
@_handle_errors
def inspect(path: str) -> None:
    """Show a model file's wmark.* metadata."""
    click.echo(json.dumps(api.inspect(path=path), indent=2, sort_keys=True))
if __name__ == "__main__":
    main()
