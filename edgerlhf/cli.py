"""The ``edgerlhf`` console script: one command, a subcommand per entry point.

    edgerlhf run --profile quick              # notebooks 00 -> 04 through papermill (python -m edgerlhf.run)
    edgerlhf report [RUN_DIR]                 # REPORT.md of a run (default: the current run)
    edgerlhf reproduce --profile tiny         # run twice and compare
    edgerlhf config [--profile P]             # every config field with its value and help
    edgerlhf setup | data | sft | reward | ppo [--profile P] [--config F] [--set K=V ...]   # one stage

Each subcommand is the ``main`` of its module and takes the same flags (``edgerlhf sft --help``).
"""
from __future__ import annotations

import importlib
import sys

#: subcommand -> (module, what it does); each module has ``main(argv)``.
COMMANDS = {
    "run": ("edgerlhf.run", "run notebooks 00 -> 04 through papermill into one run folder"),
    "report": ("edgerlhf.report", "build REPORT.md of a run from its records"),
    "reproduce": ("edgerlhf.reproduce", "run the pipeline twice (or take two runs) and compare the records"),
    "config": ("edgerlhf.core.config", "list every config field with its value and help"),
    "setup": ("edgerlhf.setup", "stage 0: environment, hardware, base model (00_Setup)"),
    "data": ("edgerlhf.data_preparation", "stage 1: HH-RLHF preference pairs (01_Data_Preparation)"),
    "sft": ("edgerlhf.sft_finetuning", "stage 2: supervised fine-tuning (02_SFT_Finetuning)"),
    "reward": ("edgerlhf.reward_modeling", "stage 3: reward models at bf16, int8, int4 (03_Reward_Modeling)"),
    "ppo": ("edgerlhf.ppo_alignment", "stage 4: PPO against each reward model (04_PPO_Alignment)"),
}


def usage() -> str:
    """The list of subcommands, as ``edgerlhf --help`` prints it."""
    width = max(map(len, COMMANDS))
    lines = ["usage: edgerlhf COMMAND [flags]   (edgerlhf COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its module's ``main(argv[1:])``; returns the exit status (2: unknown command)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"edgerlhf: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    status = importlib.import_module(COMMANDS[name][0]).main(rest)
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
