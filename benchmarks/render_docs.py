"""Render docs/benchmark-results.md from benchmarks/results/*.json: every result file's headline numbers.

The page is generated, never edited by hand: rerun this after any benchmark. Each file's ``summary`` (a
table or a mapping) is shown when it has one, otherwise its top-level scalars and small mappings; the
machine and date it was measured on come first, so numbers from different runs are never mixed unseen.

Usage: python benchmarks/render_docs.py [--out docs/benchmark-results.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
MAX_ROWS = 40

WHAT = {
    "embed_overhead": "embedding time and accuracy against the identical fine-tune without the mark",
    "trigger_set": "the trigger set on the marked model, an attacker's fine-tuned copy and a null panel",
    "trigger_retention": "how much of the trigger set survives the attacker's fine-tune, over fresh keys",
    "trigger_retention_demo": "the same on the demo's 2-epoch base",
    "whitebox_robustness": "the weight mark against every weight attack (Fashion-MNIST CNN)",
    "whitebox_null": "the white-box null: p-value calibration over (model, fresh key) pairs",
    "whitebox_speed": "white-box verification time on a 26.8M-parameter file",
    "whitebox_real": "the weight mark on a residual CNN and on MiniLM, through function-preserving rewrites",
    "whitebox_real_quick": "its quick mode",
    "extraction": "the flip API mark against extracted surrogates",
    "extraction_tiebreak": "the tie-break API mark against extracted surrogates (first run)",
    "extraction_tiebreak_replication4": "tie-break mark, current library, ten fresh keys",
    "extraction_tiebreak_replication5": "tie-break mark, current library, ten more fresh keys",
    "extraction_tiebreak_sequential": "the sequential log test beside the fixed one on the same keys, thieves and logs",
    "tiebreak_references": "eight against sixteen reference surrogates",
    "http_probe": "queries/s against a local server and the transcript's overhead",
    "gauntlet": "every scheme against every attack, with a null panel",
    "gauntlet-resnet": "the gauntlet on a BatchNorm residual CNN (resnet-small, Fashion-MNIST 3x32x32, reduced scale)",
    "gauntlet-text": "the gauntlet on a text transformer (tiny-bert on fortunes)",
    "forgery": "false claims (adversarial 'triggers', key search) and tampering",
    "forgery_quick": "its quick mode",
    "monitor": "the extraction monitor on honest and thief traffic",
    "monitor_quick": "its quick mode",
    "serve_throughput": "serving throughput: unmarked, gated and tie-break marked (one pass and two) side by side",
    "cost_target_text": "`cost_target.py --text`: the same on the MiniLM fortunes victim, 10 keys (halves of about 950 test texts)",
    "cost_target": "how well `tiebreak build --max-cost` holds its target: scales picked on half the test split, cost on the other half and on 30k training images, 20 keys",
    "tiebreak_cost_k0": "the tie-break mark's cost-power curve (shift scales, near-tie swap), one key, three thief families",
    "text": "MiniLM on fortunes: embedding cost, black-box detection, thief's fine-tune, null panel",
    "research_trigger_features": "trigger retention with triggers pulled to their label's feature region (negative)",
    "research_trigger_robust": "trigger-embedding variants on the same 10 fresh keys: mixing vs lookahead",
    "research_trigger_robust_quick": "its quick prune: eleven embedding variants on 2-3 keys",
    "research_trigger_robust_timing": "embedding wall time of mixing and lookahead, interleaved with the plain loop",
    "research_trigger_robust3": "third round: lookahead for 4 epochs vs mixing on 10 held-out fresh keys",
    "research_trigger_robust3_quick": "third round's selection: lookahead direction, radius and length on 3 keys",
    "research_trigger_robust3_pb4": "third round: lookahead with 4 triggers per step on the held-out keys",
    "research_trigger_robust3_every": "third round: the trigger pass on every other step (negative)",
    "research_trigger_robust3_fresh": "the default embedding (lookahead, 4 per step, 4 epochs) on 10 further fresh keys",
    "research_trigger_robust3_reinit": "the adopted embedding against a re-initialised head",
    "research_trigger_robust3_timing": "embedding time: plain, mixing, lookahead with 8 and 4 per step, interleaved",
    "text_extraction": "the tie-break mark on a text classifier (fortunes, tiny-BERT victim): cost, thieves, null",
    "text_extraction_low_beta": "the same at shift scales 0.15 and 0.1",
    "text_extraction_minilm": "the same with a thief on the public MiniLM encoder",
    "text_extraction_quick": "its quick mode",
    "research_lexical_mark": "a keyed lexical text mark against the one-epoch MiniLM thief, a pre-check (negative)",
    "research_residual_statistic": "the tie-break statistic read centred or with the served head projected out, on "
                                   "simulated MiniLM thieves (a pre-check)",
    "research_whitebox_real_graphs": "the white-box graph reader on 18 torchvision classifiers (random weights), "
                                     "before and after the stricter opaque-op rules, its claims checked on each model",
    "text_extraction_minilm_centred_a": "the stopped MiniLM thief at beta 1, its label verdicts read plain and centred "
                                        "side by side (six fresh keys; the stage that adopted centring)",
    "text_extraction_minilm_centred_b": "the same on six more fresh keys",
    "text_extraction_minilm_centred_1ep": "the MiniLM thief trained exactly one epoch, read plain and centred (eight "
                                          "fresh keys, a replication)",
    "text_extraction_minilm_centred_probe_a": "the MiniLM probe thief (a linear head on the frozen public encoder), read "
                                              "plain and centred (four fresh keys)",
    "text_extraction_minilm_centred_probe_b": "the same on four more fresh keys",
    "text_extraction_tinybert_centred_probe_a": "the MiniLM probe thief against the tiny-BERT victim, read plain and "
                                                "centred (four fresh keys)",
    "text_extraction_tinybert_centred_probe_b": "the same on four more fresh keys",
    "text_extraction_tinybert_public_probe_a": "the same probes with the rule read from the public MiniLM encoder "
                                               "(same keys and seeds)",
    "text_extraction_tinybert_public_probe_b": "the same on the other four keys",
    "text_extraction_tinybert_sequential_probe_a": "the same probes (served map) with the sequential log test read "
                                                   "plain and centred beside (same keys and seeds)",
    "text_extraction_tinybert_sequential_probe_b": "the same on the other four keys",
    "text_extraction_tinybert_half_served_a": "the MiniLM probe thief against the tiny-BERT victim at beta 0.5, served "
                                              "map (same keys and seeds)",
    "text_extraction_tinybert_half_served_b": "the same on the other four keys",
    "text_extraction_tinybert_half_public_a": "the same probes at beta 0.5 with the public-encoder map",
    "text_extraction_tinybert_half_public_b": "the same on the other four keys",
    "text_extraction_minilm_sequential_a": "the stopped MiniLM thief with the sequential log test read plain and "
                                           "centred side by side (four fresh keys; the stage on its reading)",
    "text_extraction_minilm_sequential_b": "the same on four more fresh keys",
    "extraction_families_centred_a": "five image thief families at beta 1, read centred beside the library's reading "
                                     "(one fresh key, a pre-check)",
    "extraction_families_centred_b": "the same on another fresh key",
    "research_text_cost": "what each text trigger embedding costs a MiniLM fine-tune on the whole owner third, per seed",
    "research_lookahead_batchnorm": "lookahead against mixing on a BatchNorm resnet: triggers learnt",
    "research_text_default_scratch": "the margin's own trigger pass against mixing on text models trained from scratch",
    "text_extraction_minilm_victim": "the tie-break mark on a MiniLM victim, with MiniLM thieves and MiniLM nulls",
    "text_extraction_minilm_pooled": "the MiniLM victim at beta 1 on three more keys; the log test pooled with committed texts",
    "text_extraction_minilm_more": "the MiniLM victim and its in-scope MiniLM thief at beta 1 on three more keys, library unchanged",
    "text_extraction_minilm_k12": "the same on three more keys (keys 10-12 of the MiniLM victim), a plain replication",
    "text_extraction_minilm_k15": "the same on three more keys (keys 13-15 of the MiniLM victim), a plain replication",
    "text_extraction_minilm_readings": "the same on three more keys, each suspect read from its labels and from its "
                                       "probabilities side by side",
    "text_extraction_minilm_readings2_a": "both readings on three more fresh keys (the run that decided a text key "
                                          "reads labels by default)",
    "text_extraction_minilm_readings2_b": "its twin on three more fresh keys, in parallel",
    "text_extraction_minilm_k64": "the MiniLM thief on three more keys with the rule's 64 feature directions "
                                  "(first stage of the directions comparison)",
    "text_extraction_minilm_k256": "the same keys and thief seeds with 256 feature directions",
    "text_extraction_minilm_s2k64": "three more keys with 64 feature directions (second stage)",
    "text_extraction_minilm_s2k128": "the same keys and thief seeds with 128 feature directions",
    "text_extraction_minilm_s3bk64": "three more keys with 64 feature directions (third stage, key set b)",
    "text_extraction_minilm_s3bk128": "the same keys and thief seeds with 128 feature directions",
    "text_extraction_minilm_s3ak64": "three more keys with 64 feature directions (third stage, key set a)",
    "text_extraction_minilm_s3ak128": "the same keys and thief seeds with 128 feature directions",
    "text_extraction_minilm_s4k64": "six more keys with 64 feature directions at beta 1 (fourth stage)",
    "text_extraction_minilm_s4k128": "the same keys and thief seeds with 128 feature directions at beta 0.95 (equal cost)",
    "text_extraction_minilm_s5k64": "six more keys, 64 directions at beta 1, a MiniLM thief trained exactly one epoch (fifth stage)",
    "text_extraction_minilm_s5k128": "the same keys and thief seeds, 128 directions at beta 0.95",
    "research_text_components_cost": "the text mark's honest cost by feature directions and shift scale on ten "
                                     "keys, read off the victim's answers (no thief)",
    "mark_on_alarm": "the tie-break mark only for clients the monitor flags: honest shops' cost, thieves' verdicts",
    "mark_on_alarm_quick": "its quick mode",
    "extraction_families": "thieves of ten families, leave-family-out, at beta 1 on three fresh keys (beta 0.5 on one)",
    "extraction_families_quick": "its quick mode",
    "extraction_families_variants_quick": "quick mode (one key, four families) with the 2000-query and pooled log tests",
    "extraction_families_b05": "thieves of ten families, leave-family-out, at beta 0.5 on two fresh keys",
    "extraction_families_b04": "the same at beta 0.4 on the same keys and thief seeds",
    "extraction_families_curve_b1": "the cost-power curve on two fresh keys shared by its points: beta 1",
    "extraction_families_curve_b07_b04": "the same keys, thieves and seeds at beta 0.7 and 0.4",
    "extraction_curve_same_keys": "the same-keys curve's points and thief pairs, from extraction_families_curve_b1 "
                                  "and _b07_b04 (research/compare_scales.py)",
    "extraction_families_b1_more_a": "thieves of ten families, leave-family-out, at beta 1 on two more fresh keys (a replication)",
    "extraction_families_b1_more_b": "the same on two more fresh keys, side by side",
    "extraction_families_readings": "the beta 1 families on two more fresh keys, every thief and null read from its "
                                    "probabilities and from its labels",
    "extraction_families_readings_b": "the same on two more fresh keys, side by side",
    "tiebreak_invariance_k0": "the principal feature map against shift-invariant ones (32, 16 directions), keys 0-1",
    "tiebreak_invariance_k2": "the same on keys 2-3",
    "tiebreak_conv1_k0": "the principal feature map against the first conv layer pooled over the image, keys 0-1",
    "tiebreak_conv1_k2": "the same on keys 2-3",
    "tiebreak_rank_k24": "the library's keyed head against rank-1 and rank-3 heads (same map and energy), keys 24-25",
    "tiebreak_rank_k26": "the same on keys 26-27",
    "tiebreak_shared_k30": "the principal map against the 32 directions the MLP references represent best, keys 30-31",
    "tiebreak_shared_k32": "the same on keys 32-33",
    "tiebreak_aug_references_k0": "MLP references distilled with shift augmentation, leave-family-out, keys 0-1",
    "tiebreak_aug_references_k2": "the same on keys 2-3",
    "tiebreak_aug_references_control_k0": "augmented references against as many more unshifted ones, keys 0-1",
    "tiebreak_aug_references_control_k2": "the same on keys 2-3",
    "tiebreak_tta_k0": "the log test reading the suspect on shifted copies of the logged inputs, keys 0-1",
    "tiebreak_tta_k2": "the same on keys 2-3",
    "tiebreak_weighting_k0": "the tie-break statistic with key-free per-direction weights at test time, keys 0-1",
    "tiebreak_weighting_k2": "the same on keys 2-3",
    "research_pooled_invariance": "how far the keyed shift survives image shifts under conv-layer and logit feature maps, near ties too",
    "tiebreak_aug_victim": "the tie-break mark on a served CNN trained with shifts, four thief families, four keys",
    "tiebreak_aug_victim_families": "the same served CNN against eight thief families on three more keys",
    "tiebreak_aug_victim_k11": "the same served CNN, four thief families, keys 11-12",
    "tiebreak_aug_victim_k13": "the same on keys 13-14",
    "tiebreak_aug_victim_b05": "the same served CNN at beta 0.5, four thief families, four more keys",
    "tiebreak_scaling": "how the LFO log-test Z grows with the honest cost, fitted on the beta 1, 0.5 and 0.4 families runs",
}
HISTORY = ("extraction_regions", "extraction_regions_k300", "extraction_tiebreak_replication", "extraction_tiebreak_replication2",
           "extraction_tiebreak_replication3", "extraction_tiebreak_skip16")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        # 4 significant digits, but a small number is never rounded onto a whole number it is not: log10 p =
        # -5.99985 is not -6 (alpha = 1e-6), and a rounded "-6" would read as a detection
        for digits in range(4, 18):
            text = f"{value:.{digits}g}"
            if abs(value) >= 100 or float(text) == value or float(text) != round(float(text)):
                return text
        return repr(value)
    if isinstance(value, (list, dict)):
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns and not isinstance(row[c], (list, dict))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows[:MAX_ROWS]]
    if len(rows) > MAX_ROWS:
        lines.append(f"\n({len(rows) - MAX_ROWS} more rows in the JSON)")
    return lines


def _mapping(doc: dict[str, Any], skip: tuple[str, ...] = ("machine", "rows")) -> list[str]:
    lines = []
    for name, value in doc.items():
        if name in skip:
            continue
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lines += ["", f"`{name}`:", "", *_table(value), ""]
        else:
            lines.append(f"* `{name}`: {_fmt(value)}")
    return lines


def render(results: Path) -> str:
    """The markdown page for every ``*.json`` under ``results`` (history runs last)."""
    files = sorted(results.glob("*.json"), key=lambda p: (p.stem in HISTORY, p.stem))
    out = ["# Benchmark results", "",
           ("Generated by `python benchmarks/render_docs.py` from `benchmarks/results/*.json`; do not edit. What "
           "each benchmark measures and how to run it: [benchmarks.md](benchmarks.md). Earlier runs kept for the "
           "record come last."), ""]
    for path in files:
        doc = json.loads(path.read_text())
        machine = doc.get("machine", {}) if isinstance(doc, dict) else {}
        where = ", ".join(f"{k} {machine[k]}" for k in ("date", "cpus", "torch") if k in machine)
        title = path.stem + (" (earlier run, kept for the record)" if path.stem in HISTORY else "")
        what = WHAT.get(path.stem, "the record of an earlier run")
        out += [f"## {title}", "", what[:1].upper() + what[1:] + (f"; measured {where}." if where else "."), ""]
        summary = doc.get("summary") if isinstance(doc, dict) else None
        if isinstance(summary, list) and summary and isinstance(summary[0], dict):
            out += _table(summary)
        elif isinstance(summary, dict):
            out += _mapping(summary)
        elif isinstance(doc, dict):
            out += _mapping(doc, skip=("machine", "rows", "cells", "pairs_log10_p", "groups"))
        markdown = path.with_suffix(".md")
        if markdown.is_file():
            out += ["", f"Full table: [{markdown.name}](../benchmarks/results/{markdown.name})."]
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT.parent / "docs" / "benchmark-results.md"))
    args = parser.parse_args()
    Path(args.out).write_text(render(RESULTS))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
