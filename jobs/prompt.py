"""Zero- and few-shot prompting, no training: score rows with a pretrained causal LM or T5's label words.

    python -m jobs.prompt --config configs/prompting-fewshot.yaml                   # k folds -> member folder
    python -m jobs.prompt --config configs/prompting-fewshot.yaml --input holdout.csv --output logits.parquet

Without --input, every training row is scored with examples from the other folds and the member folder
<run.storage_path>/<run.name>/ (member.json, oof.parquet, a prompting checkpoint per fold) is written for
jobs/ensemble, comparisons, predict and Serve. With
--input, that file's rows are scored with examples from the training rows. Log loss and accuracy are printed.
"""

from __future__ import annotations

import argparse
import json

from app.config import load_config
from app.fewshot import prompt_cv, prompt_file
from app.members import LOGIT_COLUMNS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (only what differs from the defaults)")
    parser.add_argument("--input", help="Kaggle file to score (labels optional); default: the k folds of the training rows")
    parser.add_argument("--output", help="with --input: a .parquet file for the rows' logits (id, logit_a, logit_b, logit_tie)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. prompting.k=8 prompting.selection=retrieved")
    args = parser.parse_args(argv)
    if args.output and not args.input:
        parser.error("--output needs --input (without it the member folder is written)")
    config = load_config(args.config, args.overrides)
    if args.input is None:
        member = prompt_cv(config)
        print(json.dumps({"member": member.directory, "oof_log_loss": member.meta["oof_log_loss"],
                          "oof_accuracy": member.meta["oof_accuracy"], "mean_examples": member.meta["mean_examples"],
                          "folds": [{k: fold[k] for k in ("fold", "valid_log_loss", "valid_accuracy")}
                                    for fold in member.meta["folds"]]}, indent=2), flush=True)
        return
    result = prompt_file(config, args.input)
    if args.output:
        frame = result.ids.astype(str).to_frame("id").reset_index(drop=True)
        frame[list(LOGIT_COLUMNS)] = result.logits
        frame.to_parquet(args.output, index=False)
    print(json.dumps({"rows": len(result.logits), "mean_examples": float(result.examples_kept.mean()),
                      **result.metrics, **({"output": args.output} if args.output else {})}, indent=2), flush=True)


if __name__ == "__main__":
    main()
