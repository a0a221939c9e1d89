"""EdgeRLHF: full RLHF (SFT, BF16/INT8/INT4 reward models, PPO) on one 8 GB GPU."""
__version__ = "0.1.0"
