"""Stages 3 and 4 (03_Reward_Modeling, 04_PPO_Alignment): The chain of inputs between stages, checked by hash: the
data set (stage 1) → the SFT model trained on its training file (stage 2) → the reward-model set trained on that SFT
model and data (stage 3) → PPO (stage 4).

Each stage writes the sha256 of what it read beside what it made (``sft_info.json``, ``models/rm/evaluation.json``)
and into its run record; the next stage recomputes them and refuses a link that does not hold, naming the files.
"""
from __future__ import annotations

import json
from pathlib import Path

from .files import folder_digest
from .prefs import TRAIN

SFT_INFO = "sft_info.json"


class ProvenanceError(ValueError):
    """Two stages' outputs do not belong together (the message names both and the stage to run again)."""


def sft_identity(model_dir: str | Path, data_hashes: dict[str, str] | None = None) -> dict[str, str]:
    """The SFT model in ``model_dir`` (``models/sft/model``): the digest of its merged weights, checked against the
    one ``sft_info.json`` recorded when it was saved, and the training file it was trained on, checked against
    ``data_hashes`` (:func:`edgerlhf.core.prefs.check_data_set` of the data folder now) unless that is None.

    Returns:
        ``{"sft_weights_sha256", "sft_train_sha256"}`` for the caller's outputs and record.

    Raises:
        FileNotFoundError: no SFT model (the message says to run stage 2).
        ProvenanceError: ``sft_info.json`` is damaged or predates digests, the weights changed since they were
            saved, or the model was trained on another training file than the data folder holds.
    """
    model_dir = Path(model_dir)
    info_path = model_dir / SFT_INFO
    if not info_path.exists():
        raise FileNotFoundError(f"{info_path}: no SFT model; run 02_SFT_Finetuning (python -m edgerlhf.sft_finetuning)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        recorded, trained_on = info["weights_sha256"], info["data_sha256"][TRAIN]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ProvenanceError(f"{info_path}: no weights_sha256/data_sha256 ({type(exc).__name__}: {exc}); the SFT "
                              "model predates provenance checks or the file is damaged: run 02_SFT_Finetuning "
                              "again") from None
    weights = folder_digest(model_dir / "merged")
    if weights != recorded:
        raise ProvenanceError(f"{model_dir / 'merged'}: weights sha256 {weights[:12]}… differ from the "
                              f"{recorded[:12]}… {info_path} recorded: the SFT model was changed after it was "
                              "saved; run 02_SFT_Finetuning again")
    if data_hashes is not None and trained_on != data_hashes.get(TRAIN):
        raise ProvenanceError(f"the SFT model in {model_dir} was trained on a {TRAIN} with sha256 {trained_on[:12]}…, "
                              f"but the data folder now holds {str(data_hashes.get(TRAIN))[:12]}…: run "
                              "02_SFT_Finetuning again on the current data (or restore the data it saw)")
    return {"sft_weights_sha256": weights, "sft_train_sha256": trained_on}


def check_reward_inputs(evaluation_path: str | Path, inputs: dict, now: dict) -> None:
    """Check that the reward-model set was made from the inputs present now: ``inputs`` is the ``inputs`` field
    of ``models/rm/evaluation.json``, ``now`` the same keys recomputed (data files' and SFT weights' sha256).

    Raises:
        ProvenanceError: a key is missing from ``inputs`` or differs (the message names it and what to rerun).
    """
    for key, value in now.items():
        if (inputs or {}).get(key) != value:
            raise ProvenanceError(
                f"{evaluation_path}: the reward models were made from {key} = {str((inputs or {}).get(key))[:12]}…, "
                f"but it is now {str(value)[:12]}…: run 03_Reward_Modeling again on the current data and SFT model")


def check_reward_set(rm_dir: str | Path, evaluation: dict) -> dict[str, str]:
    """Check that every reward model ``models/rm/evaluation.json`` lists (``evaluation``, its parsed content) holds
    the trained weights its verdict was computed on: the digest of each folder
    (:func:`edgerlhf.core.reward_scoring.weights_digest`) against the ``weights_sha256`` recorded beside the
    verdict. Returns ``{folder name: digest}`` for the run record.

    Raises:
        ProvenanceError: a model has no recorded digest (an evaluation written before digests), its folder is
            missing, or its weights differ (the set is mixed: a model replaced after its verdict).
    """
    from .reward_scoring import weights_digest

    rm_dir = Path(rm_dir)
    where = rm_dir / "evaluation.json"
    digests = {}
    for name, entry in (evaluation.get("models") or {}).items():
        folder = rm_dir / Path(entry.get("folder") or name).name
        recorded = entry.get("weights_sha256")
        if not recorded:
            raise ProvenanceError(f"{where}: model {name!r} has no weights_sha256 (written before digests were "
                                  "recorded): run 03_Reward_Modeling again")
        if not folder.is_dir():
            raise ProvenanceError(f"{where} lists {name!r} in {folder}, which is missing: run 03_Reward_Modeling again")
        digests[folder.name] = weights_digest(folder)
        if digests[folder.name] != recorded:
            raise ProvenanceError(f"{folder}: weights sha256 {digests[folder.name][:12]}… are not the "
                                  f"{recorded[:12]}… that {where} evaluated for {name!r}: the reward-model set is "
                                  "mixed; run 03_Reward_Modeling again")
    return digests
