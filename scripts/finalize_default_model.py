#!/usr/bin/env python
"""Write the bundled model from a trained checkpoint: the same weights, with the model card's facts
in its metadata (training subjects and their provenance, split, recipe, data-use terms, time) and
without the temporary paths of the run that made it.

    python scripts/finalize_default_model.py TRAINED.pt OUTPUT.pt --recipe TEXT --seconds S
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "FusionINN"))

from FusionINNLib.io.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

# Where each training subject comes from (../shared/data/PROVENANCE.md), by subject-id prefix.
PROVENANCE = (
    ("Brats18_2013_", "BraTS 2018 training set, BraTS 2013 institutions"),
    ("Brats18_CBICA_", "BraTS 2018 training set, CBICA / UPenn"),
    ("Brats18_TCIA", "BraTS 2018 training set, TCIA institutions"),
    ("deepmedic_brats_2013_", "BraTS 2015 (BraTS 2013 HGG), z-scored export of the deepmedic examples"),
    ("BraTS-GLI-", "BraTS 2023 adult glioma"),
)
DATA_TERMS = (
    "Trained on real MRI from the BraTS challenges. BraTS 2018 subjects: BraTS data-use terms, research use "
    "only; cite Menze et al., IEEE TMI 34(10), 2015, and Bakas et al., Sci Data 4:170117, 2017 / "
    "arXiv:1811.02629. BraTS 2013/2015 subjects (deepmedic examples): CC BY-NC-SA 3.0, non-commercial. "
    "BraTS 2023 subject: BraTS 2023 challenge terms, cite BraTS 2023. The model inherits these terms: "
    "research, non-commercial use; not for clinical decisions."
)


def provenance(subject: str) -> str:
    for prefix, source in PROVENANCE:
        if subject.startswith(prefix):
            return source
    return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trained")
    parser.add_argument("output")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--seconds", type=int, required=True, help="total training time (s)")
    parser.add_argument("--phase1-seconds", type=int, help="time of the crop phase (s)")
    args = parser.parse_args()
    loaded = load_checkpoint(args.trained)
    metadata = dict(loaded.metadata)
    split = metadata.get("split", {})
    train_subjects = list(split.get("train_subjects", []))
    val_subjects = list(split.get("val_subjects", []))
    if len(val_subjects) < 5 or set(train_subjects) & set(val_subjects):
        raise SystemExit(f"need >= 5 validation subjects disjoint from training, got {val_subjects}")
    data = dict(metadata.get("data", {}))
    data.pop("data_dir", None)  # a temporary path of the run, meaningless elsewhere
    metadata["data"] = data
    training = dict(metadata.get("training", {}))
    config = dict(training.get("config", {}))
    for key in ("data_dir", "output", "run_dir", "history_table", "metrics_table", "plot", "cache_dir", "resume",
                "init_model"):
        config.pop(key, None)
    training["config"] = config
    metadata["training"] = training
    metadata["trained_on"] = {
        "description": f"{len(train_subjects)} real subjects of ../shared/data/brats (T1-Gd + FLAIR, every brain "
                       f"slice); {len(val_subjects)} further subjects held out for validation",
        "train_subjects": {s: provenance(s) for s in train_subjects},
        "val_subjects": {s: provenance(s) for s in val_subjects},
    }
    metadata["data_use_terms"] = DATA_TERMS
    metadata["model_card"] = "docs/models.md"
    metadata["recipe"] = args.recipe
    metadata["training_seconds"] = args.seconds
    if args.phase1_seconds is not None:
        metadata["training_seconds_phase1"] = args.phase1_seconds
    save_checkpoint(args.output, loaded.model, metadata=metadata)
    size = Path(args.output).stat().st_size
    print(f"wrote {args.output} ({size / 1024:.0f} KB): {len(train_subjects)} training / {len(val_subjects)} "
          f"validation subjects, {args.seconds} s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
