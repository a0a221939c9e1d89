"""The shared pieces under the stage modules: config, base models, memory, records, metrics and statistics,
data files, and the PPO algorithm (``ppo``, ``ppo_loop``). Data flows one way: notebooks -> stage modules
(``edgerlhf.setup``, ``edgerlhf.data_preparation``, ``edgerlhf.sft_finetuning``, ``edgerlhf.reward_modeling``,
``edgerlhf.ppo_alignment``) -> these modules, which never import a stage."""
