"""The evidence commands of the ``wmark`` command line (``signing-key``, ``sign``, ``verify-signature``,
``recheck``): thin click shells over :mod:`wmark.signing` and :mod:`wmark.recheck`, registered on
:data:`wmark.cli.main`.

Exit codes: 0 valid / same verdict, 1 different or unconfirmed verdict (recheck), 2 tampered, unsigned, or a
usage error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from wmark import signing
from wmark.cli_common import check_outputs
from wmark.errors import UsageError

EVIDENCE_EXIT_HELP = """\b
Exit codes:
  0  signature valid / same verdict
  1  recheck: the recomputed verdict differs, or a test could not be recomputed
  2  tampered: a digest, signature or key commitment fails; or a usage error
  130  interrupted (Ctrl-C)"""


def _is_model(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".safetensors"


def check_release(*, key: str, signer_key: str | None, signed_model: str | None, reference: str | None,
                  reference_signature: str | None, owner_files: tuple[str | None, ...] = ()) -> dict[str, Any] | None:
    """For ``wmark verify``: check the owner's signed release before trusting its key or reference model.

    ``owner_files`` (the tie-break rule, the served model) must then be signed under the same key as well, since
    an owner could otherwise make them after seeing a suspect. Returns what the report records, or ``None``
    when no check was asked for.
    """
    if signer_key is None:
        if signed_model is not None or reference_signature is not None:
            raise UsageError("--signed-model and --reference-signature are checked with --signer-key (the owner's "
                             "public key, PEM).")
        return None
    from wmark.keys import load_key

    model = reference if reference is not None else signed_model
    if model is None:
        raise UsageError("--signer-key checks a signed release: pass --signed-model (black-box) or --reference "
                         "(white-box).")
    k = load_key(key)
    release = signing.check_key_provenance(key=k, model=model, public_key=signer_key,
                                           signature=reference_signature if reference is not None else None)
    others = [signing.check_key_provenance(key=k, model=f, public_key=signer_key)
              for f in dict.fromkeys(f for f in owner_files if f is not None and f != model)]
    return dict(release, owner_files=others) if others else release


def register(main: click.Group, handle_errors: Any) -> None:
    """Add the evidence commands to the ``wmark`` group (``handle_errors`` maps errors to exit codes)."""

    @main.command("signing-key", epilog=EVIDENCE_EXIT_HELP)
    @click.option("--private-key", required=True, type=click.Path(dir_okay=False), help="Private key to write (PEM, 0600).")
    @click.option("--public-key", required=True, type=click.Path(dir_okay=False), help="Public key to write (PEM).")
    @click.option("--force", is_flag=True, help="Overwrite existing files.")
    @handle_errors
    def signing_key(private_key: str, public_key: str, force: bool) -> None:
        """Make an elliptic-curve (P-256) key pair for signing models and reports offline."""
        check_outputs(private_key, public_key)
        info = signing.generate_signing_key(private_key=private_key, public_key=public_key, overwrite=force)
        click.echo(f"wrote {private_key} (mode 0600, keep it secret) and {public_key}\n"
                   f"public key fingerprint: sha256:{info['fingerprint']}")

    @main.command("sign", epilog=EVIDENCE_EXIT_HELP)
    @click.argument("path", type=click.Path(exists=True))
    @click.option("--private-key", required=True, type=click.Path(dir_okay=False), help="Signing key (EC, PEM).")
    @click.option("--key", "wm_key", default=None, type=click.Path(dir_okay=False),
                  help="The watermark key the model was released under (binds its commitment; needed only when the "
                       "model records none).")
    @click.option("--certificate", default=None, type=click.Path(dir_okay=False),
                  help="Sign as this certificate (for --private-key) instead of as a bare key.")
    @click.option("--chain", multiple=True, type=click.Path(dir_okay=False),
                  help="Intermediate certificates to embed (repeat).")
    @handle_errors
    def sign(path: str, private_key: str, wm_key: str | None, certificate: str | None, chain: tuple[str, ...]) -> None:
        """Sign a model (file or directory, with a provenance statement) or any file (a report, a transcript).

        The bundle is written next to it as PATH.sig (Sigstore bundle format, OpenSSF model-signing).
        """
        target = Path(path)
        if _is_model(target) or wm_key is not None:
            from wmark.keys import load_key

            info = signing.sign_model(path=target, private_key=private_key,
                                      key=load_key(wm_key) if wm_key else None, certificate=certificate, chain=chain)
            commitment = info["commitment"] or "none recorded (pass --key to bind one)"
            click.echo(f"signed {target}: {info['signature']}, provenance {info['provenance']} "
                       f"({info['provenance_signature']})\nkey commitment: {commitment}")
        else:
            out = signing.sign_file(path=target, private_key=private_key, certificate=certificate, chain=chain)
            click.echo(f"signed {target}: {out}")

    @main.command("verify-signature", epilog=EVIDENCE_EXIT_HELP)
    @click.argument("path", type=click.Path(exists=True))
    @click.option("--public-key", default=None, type=click.Path(dir_okay=False), help="The signer's public key (PEM).")
    @click.option("--certificate-chain", multiple=True, type=click.Path(dir_okay=False),
                  help="Trusted certificates (repeat), for a certificate signature.")
    @click.option("--signature", default=None, type=click.Path(dir_okay=False), help="Bundle (default PATH.sig).")
    @click.option("--key", "wm_key", default=None, type=click.Path(dir_okay=False),
                  help="Also check that this watermark key is the one the model was released under.")
    @click.option("--json", "as_json", is_flag=True, help="Print what was checked as JSON.")
    @handle_errors
    def verify_signature(path: str, public_key: str | None, certificate_chain: tuple[str, ...], signature: str | None,
                         wm_key: str | None, as_json: bool) -> None:
        """Check that PATH is exactly what the signer signed; exit 0 if so, 2 if not."""
        chain = list(certificate_chain) if certificate_chain else None
        target = Path(path)
        if signing.provenance_path(target).is_file():
            if wm_key is not None:
                from wmark.keys import load_key

                doc = signing.check_key_provenance(key=load_key(wm_key), model=target, public_key=public_key,
                                                   certificate_chain=chain, signature=signature)
                summary = (f"valid: {target} signed by {doc['signer_kind']} {doc['signer']}, released under key "
                           f"commitment {doc['commitment']} (signed at {doc['signed_at']}, {doc['signed_at_is']})")
            else:
                doc = signing.verify_model(path=target, public_key=public_key, certificate_chain=chain,
                                           signature=signature)
                sig = doc["model_signature"]
                summary = (f"valid: {target} signed by {sig['signer_kind']} {sig['signer']}, key commitment "
                           f"{doc['statement'].get('commitment')}")
        else:
            if wm_key is not None:
                raise UsageError(f"{target} has no provenance statement, so no key commitment to check --key against.")
            doc = signing.verify_file(path=target, public_key=public_key, certificate_chain=chain,
                                      signature=signature).to_dict()
            summary = f"valid: {target} signed by {doc['signer_kind']} {doc['signer']}"
        click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else summary)

    @main.command("recheck", epilog=EVIDENCE_EXIT_HELP)
    @click.option("--report", required=True, type=click.Path(dir_okay=False), help="Evidence report (JSON or HTML).")
    @click.option("--key", required=True, type=click.Path(dir_okay=False), help="The revealed key file.")
    @click.option("--transcript", default=None, type=click.Path(dir_okay=False),
                  help="The transcript the report names (API suspects; default: the path it records).")
    @click.option("--signer-key", default=None, type=click.Path(dir_okay=False),
                  help="The report author's public key: its signature REPORT.json.sig must verify.")
    @click.option("--rule", default=None, type=click.Path(dir_okay=False),
                  help="Tie-break test: the owner's rule file (default: the path the report names).")
    @click.option("--served", default=None, type=click.Path(dir_okay=False),
                  help="Tie-break test: the owner's served model file (default: the path the report names).")
    @click.option("--suspect", default=None, type=click.Path(dir_okay=False),
                  help="White-box test, optional: the suspect file, to re-read its bits (with --reference).")
    @click.option("--reference", default=None, type=click.Path(dir_okay=False),
                  help="White-box test: the owner's marked model the report names (with --suspect).")
    @click.option("--anchor", default=None, type=click.Path(dir_okay=False),
                  help="White-box test: the unmarked base model, where the report aligned to one (with --suspect).")
    @click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
    @handle_errors
    def recheck(report: str, key: str, transcript: str | None, signer_key: str | None, rule: str | None,
                served: str | None, suspect: str | None, reference: str | None, anchor: str | None,
                as_json: bool) -> None:
        """Recompute a report's verdict from the revealed key and the recorded answers, without the suspect.

        A white-box verdict is recomputed from the bits read its report records; given the suspect and the
        reference (and the anchor), the bits are also re-read from them.
        """
        from wmark.recheck import recheck as run

        owner_files = {k: v for k, v in (("rule", rule), ("served", served)) if v is not None}
        model_files = {k: v for k, v in (("suspect", suspect), ("reference", reference), ("anchor", anchor))
                       if v is not None}
        outcome = run(report=report, key=key, transcript=transcript, signer_key=signer_key, owner_files=owner_files,
                      model_files=model_files)
        if as_json:
            click.echo(json.dumps(outcome.to_dict(), indent=2, sort_keys=True))
        else:
            click.echo(outcome.message)
            for row in outcome.tests:
                if row["rechecked"]:
                    click.echo(f"  {row['name']}: log10 p {row['original_log10_p']:.9f} in the report, "
                               f"{row['recomputed_log10_p']:.9f} recomputed ({row['queries']} {row['unit']} from "
                               f"{row['answers_from']})")
                else:
                    click.echo(f"  {row['name']}: {row['note']}")
            click.echo("checked: " + "; ".join(outcome.checks))
        sys.exit(outcome.exit_code)
