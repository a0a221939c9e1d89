"""The shared pieces under the stage modules: config, base models, memory, records, metrics and statistics,
data files, the reward models (``probe``: the linear probe; ``reward_scoring``: loading and scoring), and PPO
(``ppo``: the algorithm; ``rollout``: generation and forward passes; ``ppo_trainer``: the loop, checkpoints).
Data flows one way: notebooks -> stage modules (``edgerlhf.setup``, ``edgerlhf.data_preparation``,
``edgerlhf.sft_finetuning``, ``edgerlhf.reward_modeling``, ``edgerlhf.ppo_alignment``) -> these modules, which never
import a stage."""
