"""Unit tests of the PPO algorithm (edgerlhf.core.ppo), its generation and forward passes (edgerlhf.core.rollout)
and its loop (edgerlhf.core.ppo_trainer)."""
import json
import math

import pytest
import torch

from edgerlhf.core import lm, ppo, rollout
from edgerlhf.core.config import PPOStageConfig
from edgerlhf.core.models import load_causal_lm, load_tokenizer
from edgerlhf.core.ppo_trainer import build_policy, train

# ---------------------------------------------------------------- pure functions


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = ppo.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    assert torch.allclose(adv, torch.tensor([[0.45125, 0.475, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[0.95125, 0.975, 1.0]]))
    # the episode ends at the last real token: masked positions neither give nor take value
    adv, ret = ppo.gae(torch.tensor([[0.0, 1.0, 9.0]]), torch.tensor([[0.5, 0.5, 9.0]]),
                       torch.tensor([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.95)
    assert torch.allclose(adv, torch.tensor([[0.475, 0.5, 0.0]]))
    adv, _ = ppo.gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[-0.25, 0.0, 0.5]]))  # deltas -.25, -.25, .5 discounted


def test_masked_whitening():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    w = ppo.masked_whiten(x, mask)
    real = w[mask.bool()]
    assert abs(real.mean()) < 1e-6 and abs(real.std() - 1) < 1e-5
    assert (w[~mask.bool()] == 0).all()
    kept = ppo.masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert abs(kept.mean() - 3.5) < 1e-5


def test_clipped_policy_loss_values_and_gradients():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.9, 1.1]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    out = ppo.policy_loss(new, old, adv, torch.ones(1, 3), cliprange=0.2)
    # per token: max(-A r, -A clip(r)) = max(-1.5, -1.2) = -1.2; max(-.9, -.9) = -.9; max(1.1, 1.1) = 1.1
    assert out["pg_loss"].item() == pytest.approx((-1.2 - 0.9 + 1.1) / 3)
    out["pg_loss"].backward()
    grad = new.grad[0]
    assert grad[0] == 0  # clipped: no gradient
    assert grad[1] == pytest.approx(-0.9 / 3) and grad[2] == pytest.approx(1.1 / 3)
    assert out["clipfrac"].item() == pytest.approx(1 / 3)
    assert out["approx_kl"].item() > 0


def test_clipped_value_loss():
    new = torch.tensor([[1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[2.0, 1.0]])
    out = ppo.value_loss(new, old, ret, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24; token 1: 1 and 1 -> 1
    assert out["vf_loss"].item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)
    out["vf_loss"].backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == pytest.approx(0.5 * 2 * (0 - 1) / 2)


def test_kl_controller_update():
    fixed = ppo.KLController(0.1, adaptive=False)
    assert fixed.update(50.0, 32) == 0.1
    ctl = ppo.KLController(0.1, adaptive=True, target=6.0, horizon=10000)
    assert ctl.update(12.0, 32) == pytest.approx(0.1 * (1 + 0.2 * 32 / 10000))  # error clipped at +0.2
    ctl = ppo.KLController(0.1, adaptive=True, target=6.0, horizon=10000)
    assert ctl.update(5.4, 100) == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(ppo.kl_estimate(lp, ref, "k1"), torch.tensor([0.5, -1.0]))
    k3 = ppo.kl_estimate(lp, ref, "k3")
    assert (k3 >= 0).all() and k3[0] == pytest.approx(torch.exp(torch.tensor(-0.5)).item() - 1 + 0.5)
    with pytest.raises(ValueError):
        ppo.kl_estimate(lp, ref, "k2")


def test_eos_masking_and_reward_placement():
    eos = 9
    responses = torch.tensor([[5, eos, 7, 8], [1, 2, 3, 4], [eos, 3, eos, 1]])
    mask, ended = rollout.response_mask(responses, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]
    logp = torch.full((3, 4), -1.0)
    rewards, kl = ppo.compute_rewards(torch.tensor([2.0, 3.0, 4.0]), logp, logp - 0.5, mask, beta=0.1)
    assert torch.allclose(kl, 0.5 * mask)
    assert rewards[0, 1] == pytest.approx(2.0 - 0.05) and rewards[0, 2] == 0  # at the EOS, not the pad after it
    assert rewards[1, 3] == pytest.approx(3.0 - 0.05) and rewards[2, 0] == pytest.approx(4.0 - 0.05)


def test_missing_eos_penalty_and_score_normalisation():
    raw, ended = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([True, False, True, False])
    assert ppo.final_scores(raw, ended, 0.0).tolist() == [1.0, 2.0, 3.0, 6.0]
    assert ppo.final_scores(raw, ended, 1.5).tolist() == [1.0, 0.5, 3.0, 4.5]  # only rows without an EOS
    moments = ppo.RunningMoments()
    first = ppo.final_scores(raw, ended, 1.5, moments)  # the first batch: almost only its own statistics
    penalised = torch.tensor([1.0, 0.5, 3.0, 4.5])
    want = (penalised - penalised.mean()) / penalised.std(unbiased=False)
    assert torch.allclose(first, want, atol=1e-4)
    second = ppo.final_scores(torch.tensor([10.0]), torch.tensor([True]), 1.5, moments)
    n = 4 + 1e-4  # counts of the running statistics: 1e-4 prior, 4 seen, then 1 more
    mean = (penalised.sum() + 10.0) / (n + 1)
    assert second.item() == pytest.approx((10.0 - mean.item()) / moments.std, rel=1e-6) and moments.mean == \
        pytest.approx(mean.item(), rel=1e-4)


def test_running_moments():
    m = ppo.RunningMoments()
    data = torch.randn(1000) * 3 + 2
    for chunk in data.split(100):
        m.update(chunk)
    assert m.mean == pytest.approx(data.mean().item(), abs=1e-3)
    assert m.std == pytest.approx(data.std(unbiased=False).item(), rel=1e-3)


# ---------------------------------------------------------------- with tiny models

CFG = PPOStageConfig(steps=4, batch_size=4, micro_batch_size=2, gradient_accumulation_steps=1, ppo_epochs=2,
                max_new_tokens=6, learning_rate=1e-3, checkpoint_every=2, lora_r=4, lora_alpha=8)


def tiny_policy(location, seed=0):
    torch.manual_seed(seed)
    return build_policy(load_causal_lm(location).eval(), CFG)


@torch.no_grad()
def full_forward(policy, head, ro, temperature=0.7):
    """Ground truth: the policy's log-probs and values from one padded forward pass over query + reply (adapter
    on, dropout off), and the reference's log-probs (adapter off)."""
    policy.eval()
    out = rollout.forward_logprobs(policy, head, ro, temperature)
    return {"logprobs": out["logprobs"], "values": out["values"],
            "ref_logprobs": rollout.reference_logprobs(policy, ro, temperature)}


def queries_for(tokenizer, n):
    return [tokenizer(f"question {i} is about", add_special_tokens=False)["input_ids"][: 3 + i % 4] for i in range(n)]


def tiny_rollout(name, models_dir, seed, new_tokens):
    """A tiny policy, its value head, three queries and one sampled rollout of ``new_tokens`` at temperature 0.7."""
    from edgerlhf.core.models import prepare_base_model

    location = prepare_base_model(name, models_dir)
    policy, head = tiny_policy(location)
    tok = load_tokenizer(location)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    queries = queries_for(tok, 3)
    torch.manual_seed(seed)
    return policy, head, queries, rollout.rollout(policy, queries, pad, tok.eos_token_id, new_tokens, 0.7, 0, 1.0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_batched_left_padded_logprobs_equal_single_sequence(name, models_dir):
    policy, head, queries, ro = tiny_rollout(name, models_dir, seed=1, new_tokens=5)
    with torch.no_grad():
        batched = rollout.forward_logprobs(policy, head, ro, temperature=0.7)
        for i, q in enumerate(queries):
            n = int(ro["response_mask"][i].sum())
            single = {"query": torch.tensor([q]), "query_mask": torch.ones(1, len(q), dtype=torch.long),
                      "response": ro["response"][i:i + 1, :n], "response_mask": torch.ones(1, n)}
            one = rollout.forward_logprobs(policy, head, single, temperature=0.7)
            assert torch.allclose(batched["logprobs"][i, :n], one["logprobs"][0], atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_log_probs_from_the_kept_positions_equal_a_full_vocabulary_pass(name, models_dir):
    # forward_logprobs asks the model for the last R + 1 positions only (logits_to_keep); the result must be the
    # log-softmax of the full [B, Q + R, V] logits at the positions that predict each response token
    from edgerlhf.core.lm import position_ids

    policy, head, _, ro = tiny_rollout(name, models_dir, seed=2, new_tokens=6)
    ro["response_mask"][1, 3:] = 0  # row 1 ends after 3 tokens, row 2 after 5: rows of different lengths
    ro["response_mask"][2, 5:] = 0
    with torch.no_grad():
        padded = rollout.forward_logprobs(policy, head, ro, temperature=0.7, with_entropy=True)
        packed = rollout.forward_logprobs(policy, head, ro, temperature=0.7, with_entropy=True, padding_free=True)
        mask = torch.cat([ro["query_mask"], ro["response_mask"].long()], dim=1)
        logits = policy(input_ids=torch.cat([ro["query"], ro["response"]], dim=1), attention_mask=mask,
                        position_ids=position_ids(mask)).logits
        start = ro["query"].shape[1] - 1
        want = torch.log_softmax(logits[:, start:-1].float() / 0.7, dim=-1).gather(-1, ro["response"][..., None])
    real = ro["response_mask"]
    assert padded["logprobs"].shape == packed["logprobs"].shape == ro["response"].shape
    assert torch.allclose(padded["logprobs"] * real, want.squeeze(-1) * real, atol=1e-5)
    # padding-free: the rows packed into one sequence give the same log-probs, values and entropy on real tokens
    for key in ("logprobs", "values", "entropy"):
        assert torch.allclose(packed[key] * real, padded[key] * real, atol=1e-5), key


def test_forward_gives_log_probs_entropy_and_zero_initial_values(tiny_gpt2):
    policy, head = tiny_policy(tiny_gpt2)
    tok = load_tokenizer(tiny_gpt2)
    ro = rollout.rollout(policy, queries_for(tok, 2), tok.eos_token_id, tok.eos_token_id, 4, 0.7, 0, 1.0)
    with torch.no_grad():
        out = rollout.forward_logprobs(policy, head, ro, temperature=0.7, with_entropy=True)
    assert (out["logprobs"] <= 0).all() and (out["entropy"] > 0).all()
    assert torch.equal(out["values"], torch.zeros_like(out["values"]))  # zero-initialised value head


def test_logprobs_and_entropy_agree_with_trls_helpers():
    # lm.logprobs_and_entropy is hand-written; TRL's selective_log_softmax and entropy_from_logits compute the same
    # quantities, equal up to float32 rounding (not bit for bit)
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    torch.manual_seed(0)
    logits, labels = (torch.randn(2, 7, 1000) * 3).bfloat16(), torch.randint(0, 1000, (2, 7))
    for temperature in (1.0, 0.7):
        logprobs, entropy = lm.logprobs_and_entropy(logits, labels, temperature, with_entropy=True)
        z = logits.float() / temperature
        assert torch.allclose(logprobs, selective_log_softmax(z, labels), atol=1e-5)
        assert torch.allclose(entropy, entropy_from_logits(z), atol=1e-4)
    assert lm.logprobs_and_entropy(logits, labels)[1] is None


def test_chunked_rollout_and_forward_match_the_whole_batch(tiny_gpt2):
    policy, head = tiny_policy(tiny_gpt2)
    tok = load_tokenizer(tiny_gpt2)
    queries = queries_for(tok, 3)
    torch.manual_seed(0)
    ro = rollout.rollout(policy, queries, tok.eos_token_id, tok.eos_token_id, 5, 0.7, 0, 1.0, chunk_size=2)
    assert ro["response"].shape == (3, 5) and ro["query"].shape[0] == 3
    whole = rollout.reference_logprobs(policy, ro, 0.7)
    chunked = rollout.reference_logprobs(policy, ro, 0.7, chunk_size=2)
    assert chunked.shape == whole.shape == (3, 5)
    assert torch.allclose(chunked, whole, atol=1e-5)


def test_reference_is_the_sft_model_with_the_adapter_disabled(tiny_gpt2):
    sft = load_causal_lm(tiny_gpt2).eval()
    policy, head = tiny_policy(tiny_gpt2)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)  # a trained-looking adapter: the policy now differs from the SFT model
    tok = load_tokenizer(tiny_gpt2)
    ro = rollout.rollout(policy, queries_for(tok, 3), tok.eos_token_id, tok.eos_token_id, 5, 0.7, 0, 1.0)
    out = full_forward(policy, head, ro)
    with torch.no_grad():
        sft_out = rollout.forward_logprobs(sft, None, ro, 0.7)
    assert torch.allclose(out["ref_logprobs"], sft_out["logprobs"], atol=1e-5)
    assert not torch.allclose(out["logprobs"], sft_out["logprobs"], atol=1e-3)


def token_share_scorer(tokenizer, target: str):
    def scorer(prompts, replies):
        return torch.tensor([r.split().count(target) / max(len(r.split()), 1) for r in replies])
    return scorer


def gpt2_tokenizer_with_pad(location):
    from edgerlhf.core.templates import ensure_pad_token

    tok = load_tokenizer(location)
    ensure_pad_token(tok)
    return tok


def run_loop(tiny_gpt2, checkpoints, cfg, seed=0, on_step=None, extra=None):
    policy, head = tiny_policy(tiny_gpt2, seed)
    tok = gpt2_tokenizer_with_pad(tiny_gpt2)
    queries = queries_for(tok, 8)
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
    torch.manual_seed(seed)
    history = train(policy, head, tok, queries, prompts, token_share_scorer(tok, "the"), cfg, checkpoints, seed,
                    on_step, extra=extra)
    return history, policy, head


def test_resume_equals_an_uninterrupted_run_and_keeps_the_callers_state(tiny_gpt2, tmp_path):
    straight, policy_a, head_a = run_loop(tiny_gpt2, tmp_path / "a", CFG)

    def crash_at_3(step, stats):
        interrupted["curve"].append(step)
        if step == 3:  # after checkpoint-2 was written
            raise KeyboardInterrupt

    interrupted = {"curve": [0]}
    with pytest.raises(KeyboardInterrupt):
        run_loop(tiny_gpt2, tmp_path / "b", CFG, on_step=crash_at_3, extra=interrupted)
    with pytest.raises(FileExistsError, match="ppo.resume=true"):
        run_loop(tiny_gpt2, tmp_path / "b", CFG)
    resumed_cfg = PPOStageConfig(**{**CFG.__dict__, "resume": True})
    for changed, message in ((PPOStageConfig(**{**resumed_cfg.__dict__, "steps": 6}), "steps: 4 -> 6"),
                             (resumed_cfg, "seed: 0 -> 123")):
        with pytest.raises(ValueError, match=f"cannot resume with changed settings \\({message}\\)"):
            run_loop(tiny_gpt2, tmp_path / "b", changed, seed=123 if changed is resumed_cfg else 0)
    extra = {"curve": "replaced by the checkpoint's"}
    resumed, policy_b, head_b = run_loop(
        tiny_gpt2, tmp_path / "b", PPOStageConfig(**{**resumed_cfg.__dict__, "eval_every": 5, "keep_checkpoints": True}),
        on_step=lambda step, stats: extra["curve"].append(step), extra=extra)
    assert extra == {"curve": [0, 1, 2, 3, 4], "resumed_from": "checkpoint-2"}  # the points before the crash kept
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    # bit for bit: the same prompts, replies, beta history, adapter and value head
    for key in ("kl", "pg_loss", "vf_loss", "beta", "score"):
        assert [h[key] for h in straight] == [h[key] for h in resumed], key
    assert [h["samples"] for h in straight] == [h["samples"] for h in resumed]
    for (n, a), (_, b) in zip(policy_a.named_parameters(), policy_b.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), n
    assert torch.equal(head_a.weight, head_b.weight) and torch.equal(head_a.bias, head_b.bias)


def test_non_finite_reward_stops_and_saves_the_step(tiny_gpt2, tmp_path):
    policy, head = tiny_policy(tiny_gpt2)
    tok = gpt2_tokenizer_with_pad(tiny_gpt2)

    def nan_scorer(prompts, replies):
        return torch.full((len(replies),), float("nan"))

    with pytest.raises(FloatingPointError, match="non-finite score.*failed-step-0"):
        train(policy, head, tok, queries_for(tok, 4), [[{"role": "user", "content": "q"}]] * 4, nan_scorer, CFG,
              tmp_path, 0)
    assert (tmp_path / "failed-step-0" / "state.pt").exists()


def test_a_failed_step_saves_the_state_before_it_and_its_rollout(tiny_gpt2, tmp_path):
    from safetensors.torch import load_file

    policy, head = tiny_policy(tiny_gpt2)
    tok = gpt2_tokenizer_with_pad(tiny_gpt2)
    calls = []

    def nan_at_second_step(prompts, replies):
        calls.append(len(replies))
        scores = torch.ones(len(replies))
        return scores * float("nan") if len(calls) == 2 else scores

    cfg = PPOStageConfig(**{**CFG.__dict__, "checkpoint_every": 1})
    queries, prompts = queries_for(tok, 8), [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
    with pytest.raises(FloatingPointError, match="step 1: non-finite score.*failed-step-1"):
        train(policy, head, tok, queries, prompts, nan_at_second_step, cfg, tmp_path, 0)
    ok, failed = tmp_path / "checkpoint-1", tmp_path / "failed-step-1"
    saved, before = (torch.load(f / "state.pt", weights_only=True) for f in (failed, ok))
    # the failed step starts where checkpoint-1 ends: the same RNG, prompt sampler, beta and weights
    assert torch.equal(saved["generator"], before["generator"]) and saved["beta"] == before["beta"]
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b
               for key in saved["rng"] for a, b in zip(saved["rng"][key], before["rng"][key]))
    for name in ("adapter.safetensors", "value_head.safetensors"):
        a, b = load_file(failed / name), load_file(ok / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rollout = load_file(failed / "rollout.safetensors")
    assert rollout["response"].shape[0] == CFG.batch_size and rollout["raw_scores"].isnan().all()
    assert {"query", "query_mask", "response_mask", "logprobs", "ref_logprobs", "values"} <= rollout.keys()
    sampler = torch.Generator()
    sampler.set_state(saved["generator"])
    assert torch.randperm(8, generator=sampler)[: CFG.batch_size].tolist() == saved["prompt_indices"]


def toy_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "good", "bad", "ok", "no", "yes", "maybe", "hi", "there", "what", "why"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="no"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders
    raw.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ppo_learns_a_scripted_reward_with_bounded_kl(tmp_path, dtype):
    """A tiny policy learns to say "good" more often; the KL to the reference stays bounded. With its frozen base
    in bf16 (as on a GPU) the adapter and value head still train in float32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = toy_tokenizer()
    torch.manual_seed(0)
    # initializer_range 0.1 (not GPT-2's 0.02): with a tied 32-wide head, tiny weights cannot express
    # anything but a near-uniform next-token distribution, whatever the adapter learns
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                       initializer_range=0.1, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)).eval().to(dtype)
    cfg = PPOStageConfig(steps=30, batch_size=16, micro_batch_size=8, gradient_accumulation_steps=2, ppo_epochs=4,
                    max_new_tokens=8, learning_rate=3e-3, value_learning_rate=3e-3, temperature=1.0,
                    init_kl_coef=0.05, adaptive_kl=False, lora_r=8, lora_alpha=16, checkpoint_every=100)
    policy, head = build_policy(model, cfg)
    assert {p.dtype for p in policy.parameters() if p.requires_grad} | {head.weight.dtype} == {torch.float32}
    queries = [tok(q, add_special_tokens=False)["input_ids"] for q in ["hi there", "what", "why there", "hi"] * 4]
    prompts = [[{"role": "user", "content": "x"}]] * len(queries)
    history = train(policy, head, tok, queries, prompts, token_share_scorer(tok, "good"), cfg, tmp_path, 0)
    first = sum(h["score"] for h in history[:5]) / 5
    last = sum(h["score"] for h in history[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert max(h["kl"] for h in history) < 25
    for key in ("approx_kl", "clipfrac", "entropy", "explained_variance", "eos_share", "beta", "vf_loss"):
        assert all(key in h for h in history)
    json.dumps([{k: v for k, v in h.items() if k != "samples"} for h in history])  # loggable


def test_ppo_pad_token_is_distinct_from_eos_where_possible(models_dir, gpt2_tokenizer):
    from edgerlhf.core.models import prepare_base_model
    from edgerlhf.core.templates import ppo_pad_token

    llama_tok = load_tokenizer(prepare_base_model("tiny-llama", models_dir))
    assert ppo_pad_token(llama_tok) != llama_tok.eos_token_id  # SmolLM2: <|endoftext|>
    assert ppo_pad_token(gpt2_tokenizer) == gpt2_tokenizer.eos_token_id  # GPT-2 has no other special token


def test_encode_queries_truncates_from_the_left(gpt2_tokenizer):
    from edgerlhf.ppo_alignment import encode_queries
    from edgerlhf.core.templates import ensure_chat_template

    ensure_chat_template(gpt2_tokenizer)
    turns = []
    for i in range(5):
        turns += [{"role": "user", "content": f"question {i} " * 8}, {"role": "assistant", "content": "ok " * 8}]
    rows = [{"prompt": turns + [{"role": "user", "content": "last"}]}, {"prompt": [{"role": "user", "content": "x"}]}]
    counts = {}
    queries, prompts = encode_queries(gpt2_tokenizer, rows + [{"prompt": [{"role": "user", "content": "y " * 60}]}],
                                      48, counts)
    assert len(queries) == 2 and all(len(q) <= 48 for q in queries)
    assert prompts[0][-1]["content"] == "last" and len(prompts[0]) < len(rows[0]["prompt"])
    assert counts == {"prompts_kept": 2, "prompts_truncated": 1, "prompts_dropped": 1}
    with pytest.raises(ValueError, match="none of the 1 prompts fits ppo.max_prompt_length=8"):
        encode_queries(gpt2_tokenizer, rows[:1], 8)


def test_best_of_n_replies_come_from_the_sft_model_in_the_dtype_it_is_loaded_in(tiny_gpt2, monkeypatch):
    """Stage 4 samples the best-of-n replies from the SFT model in the reward models' frozen dtype: bf16 on a CPU
    that multiplies bf16 natively, float32 elsewhere; n replies per prompt, token counts including EOS."""
    from edgerlhf.core import adapters
    from edgerlhf.ppo_alignment import best_of_n_replies, load_policy

    cfg = PPOStageConfig(best_of_n=3, max_new_tokens=4, max_prompt_length=32)
    assert adapters.frozen_dtype("cpu", cfg.policy_precision) == torch.float32  # the suite's CPU: no native bf16
    monkeypatch.setattr(adapters, "cpu_bf16_native", lambda: True)
    dtype = adapters.frozen_dtype("cpu", cfg.policy_precision)
    assert dtype == torch.bfloat16
    policy, _, tok = load_policy(tiny_gpt2, cfg, torch.device("cpu"), dtype)
    assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {torch.bfloat16}  # the frozen base
    rows = [{"prompt": [{"role": "user", "content": q}]} for q in ("hello there", "why")]
    out = best_of_n_replies(policy, tok, rows, cfg, seed=0)
    assert [len(r) for r in out["replies"]] == [3, 3] and out["tokens"].shape == (2, 3)
    assert ((out["tokens"] >= 1) & (out["tokens"] <= 4)).all()


def test_a_step_that_runs_out_of_memory_is_retried_with_a_smaller_micro_batch(tiny_gpt2, tmp_path, monkeypatch):
    from edgerlhf.core import ppo_trainer

    real = ppo_trainer.ppo_step
    seen = []

    def fake_oom(*args, **kwargs):
        cfg = args[8]
        seen.append((cfg.micro_batch_size, cfg.generation_batch_size))
        if cfg.micro_batch_size > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(ppo_trainer, "ppo_step", fake_oom)
    cfg = PPOStageConfig(**{**CFG.__dict__, "steps": 2})
    history, _, _ = run_loop(tiny_gpt2, tmp_path, cfg)
    half = CFG.batch_size // 2
    assert seen == [(2, CFG.batch_size), (1, half), (1, half)]  # backed off once, then kept the smaller sizes
    assert history[0]["oom_backoffs"][0]["micro_batch"] == 2 and history[1]["oom_backoffs"] == []
    assert history[1]["micro_batch_size"] == 1


def test_evaluation_during_training_does_not_change_the_trajectory(tiny_gpt2, tmp_path):
    """eval_every 0 and 1 give identical training: evaluations sample on their own RNG (fork_rng)."""
    from edgerlhf.ppo_alignment import sample_and_measure

    runs = []
    for name, evaluate in (("plain", False), ("evaluated", True)):
        policy, head = tiny_policy(tiny_gpt2)
        tok = gpt2_tokenizer_with_pad(tiny_gpt2)
        queries, prompts = queries_for(tok, 8), [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
        scorer = token_share_scorer(tok, "the")
        cfg = PPOStageConfig(**{**CFG.__dict__, "eval_every": 1 if evaluate else 0})
        points = []

        def on_step(step, stats):
            if cfg.eval_every:
                points.append(sample_and_measure(policy, head, tok, queries[:4], prompts[:4], cfg, {"s": scorer}, 7))

        torch.manual_seed(0)
        history = train(policy, head, tok, queries, prompts, scorer, cfg, tmp_path / name, 0, on_step)
        runs.append(([(h["score"], h["kl"], h["pg_loss"], h["vf_loss"]) for h in history], points))
    (plain, _), (evaluated, points) = runs
    assert len(points) == CFG.steps and plain == evaluated  # bit for bit


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_a_reward_model_shares_the_policys_frozen_weights_and_scores_as_before(name, models_dir):
    from edgerlhf.ppo_alignment import share_frozen_weights
    from edgerlhf.core.models import prepare_base_model
    from edgerlhf.core.ppo_trainer import make_optimizer
    from edgerlhf.core.reward_scoring import backbone_of, load_backbone, score
    from edgerlhf.core.templates import ensure_chat_template, ensure_pad_token

    location = prepare_base_model(name, models_dir)
    policy, head = tiny_policy(location)
    tok = load_tokenizer(location)
    ensure_chat_template(tok)
    ensure_pad_token(tok)
    rm, _ = load_backbone(location, "bf16", "cpu")
    rm.config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.score.weight)
    params = dict(backbone_of(rm).named_parameters())
    changed = next(n for n in params if ".0." in n and n.endswith("weight"))
    with torch.no_grad():
        params[changed].add_(0.5)  # no longer the policy's value: must keep its own copy
    prompts, replies = [[{"role": "user", "content": "hi " * (i + 1)}] for i in range(3)], ["yes", "no way", "ok"]
    before = score(rm.eval(), tok, prompts, replies)

    mib = share_frozen_weights(rm, policy)
    base = {n.replace(".base_layer", ""): p for n, p in backbone_of(policy.get_base_model()).named_parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values()) / 2**20
    assert mib == pytest.approx(total - params[changed].numel() * params[changed].element_size() / 2**20)
    assert all((p.data_ptr() == base[n].data_ptr()) == (n != changed) for n, p in backbone_of(rm).named_parameters())
    assert torch.equal(score(rm, tok, prompts, replies), before)
    # a PPO update moves the adapter, never the shared base weights: the reward model scores as before
    optimizer = make_optimizer(policy, head, CFG)
    ids = torch.tensor([tok("a short text", add_special_tokens=False)["input_ids"]])
    policy.train()
    policy(input_ids=ids).logits.logsumexp(-1).mean().backward()
    optimizer.step()
    assert torch.equal(score(rm, tok, prompts, replies), before)
    assert share_frozen_weights(rm, policy) == 0  # nothing left to share


def eos_prone_policy(location, eos_id, bias):
    """A tiny policy whose LM head adds ``bias`` to the EOS logit, so sampled replies end at different lengths."""
    model = load_causal_lm(location).eval()
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight = old.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[eos_id] = bias
    model.set_output_embeddings(head)
    torch.manual_seed(0)
    return build_policy(model, CFG)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_log_probs_equal_the_distribution_generate_sampled_from(name, models_dir):
    # independent of forward_logprobs: generate's processed scores are logits / temperature at each step;
    # rows end at different lengths, so the masking after the first EOS is exercised
    from edgerlhf.core.models import prepare_base_model

    location = prepare_base_model(name, models_dir)
    tok = load_tokenizer(location)
    eos, temperature = tok.eos_token_id, 0.7
    pad = ppo_pad(tok)
    # EOS gets about 1 / (1 + e^1.5), 18%, of the probability at each step (the tiny models' logits are ~0)
    policy, head = eos_prone_policy(location, eos, bias=temperature * (math.log(len(tok)) - 1.5))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # the policy differs from the reference
    queries = queries_for(tok, 6)
    query, query_mask = lm.pad_left(queries, pad)
    torch.manual_seed(3)
    out = policy.generate(input_ids=query, attention_mask=query_mask, max_new_tokens=8, do_sample=True,
                          temperature=temperature, top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=eos,
                          output_scores=True, return_dict_in_generate=True)
    response = out.sequences[:, query.shape[1]:]
    mask, ended = rollout.response_mask(response, eos)
    lengths = mask.sum(dim=1)
    assert ended.any() and len(set(lengths.tolist())) > 2, lengths  # EOS at different places
    sampled = torch.stack(out.scores, dim=1).float().log_softmax(-1).gather(-1, response[..., None]).squeeze(-1)
    batch = {"query": query, "query_mask": query_mask, "response": torch.where(mask.bool(), response, pad),
             "response_mask": mask}
    with torch.no_grad():
        got = rollout.forward_logprobs(policy, head, batch, temperature, with_entropy=True)
    assert torch.allclose(got["logprobs"] * mask, sampled * mask, atol=1e-5)
    assert got["logprobs"].shape == response.shape and (got["entropy"] * mask > 0).any()


def ppo_pad(tok):
    from edgerlhf.core.templates import ppo_pad_token

    return ppo_pad_token(tok)


def update_batch(name, models_dir, n=4, new_tokens=5, fixed_length=False, seed=0):
    """A tiny policy, its value head and a rollout :class:`ppo.Batch` with random advantages and returns."""
    from edgerlhf.core.models import prepare_base_model

    location = prepare_base_model(name, models_dir)
    tok = load_tokenizer(location)
    policy, head = tiny_policy(location)
    torch.manual_seed(seed)
    ro = rollout.rollout(policy, queries_for(tok, n), ppo_pad(tok), tok.eos_token_id, new_tokens, 0.7, 0, 1.0,
                     min_new_tokens=new_tokens if fixed_length else 0)
    old = full_forward(policy, head, ro)
    mask = ro["response_mask"]
    batch = ppo.Batch(query=ro["query"], query_mask=ro["query_mask"], response=ro["response"], response_mask=mask,
                      logprobs=old["logprobs"], values=old["values"], advantages=torch.randn(mask.shape) * mask,
                      returns=torch.randn(mask.shape) * mask)
    return policy, head, batch


def trainable(policy, head):
    return [p.detach().clone() for p in policy.parameters() if p.requires_grad] + \
        [p.detach().clone() for p in head.parameters()]


def test_the_first_micro_batch_has_ratio_one_and_no_clipping(models_dir):
    policy, head, batch = update_batch("tiny-llama", models_dir)
    cfg = PPOStageConfig(**{**CFG.__dict__, "micro_batch_size": 4, "gradient_accumulation_steps": 1, "ppo_epochs": 1})
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad] + list(head.parameters()))
    stats = ppo.ppo_update(policy, head, optimizer, batch, cfg, torch.Generator().manual_seed(0))
    assert stats["optimizer_steps"] == 1 and stats["clipfrac"] == 0.0
    assert abs(stats["approx_kl"]) < 1e-7  # the update's forward reproduces the rollout's log-probs


@pytest.mark.parametrize("micro,accumulation", [(2, 2), (1, 3)])
def test_accumulated_micro_batches_give_the_gradient_of_the_whole_minibatch(models_dir, micro, accumulation):
    # equal reply lengths, so the token mean over the minibatch is the row-share-weighted mean of micro-batch
    # means; SGD with lr 1 and no clipping turns the parameter change into the gradient itself
    rows = micro * accumulation
    results = []
    for mb, acc in ((rows, 1), (micro, accumulation)):
        policy, head, batch = update_batch("tiny-llama", models_dir, n=rows + 1, fixed_length=True)
        cfg = PPOStageConfig(**{**CFG.__dict__, "batch_size": rows + 1, "micro_batch_size": mb,
                           "gradient_accumulation_steps": acc, "ppo_epochs": 1, "max_grad_norm": 1e9})
        before = trainable(policy, head)
        optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad] + list(head.parameters()),
                                    lr=1.0)
        stats = ppo.ppo_update(policy, head, optimizer, batch, cfg, torch.Generator().manual_seed(1))
        assert stats["optimizer_steps"] == 2  # rows + 1 rows: one full minibatch, then one of a single row
        results.append([a - b for a, b in zip(trainable(policy, head), before)])
    assert any(d.abs().max() > 0 for d in results[0])
    for whole, accumulated in zip(*results):
        assert torch.allclose(whole, accumulated, atol=1e-6)


@pytest.mark.parametrize("padding_free", [True, False])
def test_rows_one_pass_at_a_time_give_the_micro_batchs_gradient_and_statistics(models_dir, padding_free):
    # replies of unequal length: each pass must weigh by its share of the micro-batch's reply tokens, not of its
    # rows; two epochs, so the second runs at ratios other than 1 (non-trivial approx_kl and clipping)
    results, stats = [], []
    for rows_per_pass in (None, 1, 3):
        policy, head, batch = update_batch("tiny-llama", models_dir, n=4, fixed_length=True)
        for row, keep in enumerate((1, 5, 2, 4)):
            batch.response_mask[row, keep:] = 0
        for name in ("advantages", "returns"):
            setattr(batch, name, getattr(batch, name) * batch.response_mask)
        cfg = PPOStageConfig(**{**CFG.__dict__, "micro_batch_size": 4, "gradient_accumulation_steps": 1,
                                "ppo_epochs": 2, "max_grad_norm": 1e9, "rows_per_pass": rows_per_pass,
                                "padding_free": padding_free})
        before = trainable(policy, head)
        optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad] + list(head.parameters()),
                                    lr=1.0)
        stats.append(ppo.ppo_update(policy, head, optimizer, batch, cfg, torch.Generator().manual_seed(1)))
        results.append([a - b for a, b in zip(trainable(policy, head), before)])
    assert stats[0]["optimizer_steps"] == 2 and stats[0]["approx_kl"] > 0 and stats[0]["vf_loss"] > 0
    for other, deltas in zip(stats[1:], results[1:]):
        for key in ppo.UPDATE_STATS:
            assert other[key] == pytest.approx(stats[0][key], rel=1e-5, abs=1e-7), key
        for whole, by_rows in zip(results[0], deltas):
            assert torch.allclose(whole, by_rows, atol=1e-6)


def test_approx_kl_stop_is_checked_every_minibatch(models_dir):
    policy, head, batch = update_batch("tiny-llama", models_dir, n=4)
    cfg = PPOStageConfig(**{**CFG.__dict__, "micro_batch_size": 1, "gradient_accumulation_steps": 1, "ppo_epochs": 4,
                       "approx_kl_stop": 1e-4})
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad] + list(head.parameters()),
                                lr=50.0)
    stats = ppo.ppo_update(policy, head, optimizer, batch, cfg, torch.Generator().manual_seed(0))
    # the first minibatch is at ratio 1 and steps; the large step puts the second one over the limit
    assert stats["early_stopped"] and stats["epochs"] == 1 and stats["optimizer_steps"] == 1


def test_a_non_finite_gradient_is_never_stepped(models_dir):
    policy, head, batch = update_batch("tiny-llama", models_dir)
    head.weight.register_hook(lambda grad: grad * float("inf"))  # finite losses, infinite gradient
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad] + list(head.parameters()))
    before = trainable(policy, head)
    with pytest.raises(FloatingPointError, match="non-finite PPO loss or gradient"):
        ppo.ppo_update(policy, head, optimizer, batch, CFG, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(trainable(policy, head), before))


def test_reward_gain_and_bias_give_sft_replies_mean_zero_and_unit_std(tiny_gpt2):
    from edgerlhf.ppo_alignment import normalisation, sample_and_measure

    policy, head = tiny_policy(tiny_gpt2)
    tok = gpt2_tokenizer_with_pad(tiny_gpt2)
    queries, prompts = queries_for(tok, 6), [[{"role": "user", "content": f"q{i}"}] for i in range(6)]

    def scorer(prompts, replies):
        return torch.tensor([3.0 + len(r) for r in replies])

    cfg = PPOStageConfig(**{**CFG.__dict__, "reward_norm_samples": 6})
    gain, bias = normalisation(policy, head, tok, queries, prompts, cfg, scorer, 5)
    again = sample_and_measure(policy, head, tok, queries, prompts, cfg, {"rm": scorer}, 5)  # the same replies
    scaled = gain * torch.tensor(again["rm_scores"]) + bias
    assert scaled.mean().item() == pytest.approx(0.0, abs=1e-5) and scaled.std().item() == pytest.approx(1.0)
    assert normalisation(policy, head, tok, queries, prompts, CFG, scorer, 5) == (1.0, 0.0)  # off by default


def test_length_groups_pad_each_group_to_its_own_longest_row():
    lengths = [182, 252, 46, 121, 38, 88, 143, 84, 0]
    groups = rollout.length_groups(lengths, slack=0.1)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        widest, real = lengths[g[0]], sum(lengths[i] for i in g)
        assert widest == max(lengths[i] for i in g)
        assert len(g) == 1 or widest * len(g) - real <= 0.1 * real
    assert rollout.length_groups([5, 5, 5]) == [[0, 1, 2]] and rollout.length_groups([]) == []


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_a_prefilled_cache_continues_exactly_as_the_padded_pass(name, models_dir):
    """The cache built on each length group's real columns gives the last query token the logits of one pass
    over the whole left-padded block, and greedy generation from it emits the same tokens."""
    from edgerlhf.core.models import prepare_base_model

    location = prepare_base_model(name, models_dir)
    policy, _ = tiny_policy(location)
    tok = load_tokenizer(location)
    queries = [list(range(5, 5 + n)) for n in (9, 2, 1, 6, 9, 3)]  # unequal lengths, one single-token query
    query, mask = lm.pad_left(queries, 0)
    positions = lm.position_ids(mask)
    with torch.no_grad():
        full = policy(input_ids=query, attention_mask=mask, position_ids=positions).logits[:, -1]
        cache = rollout.prefill_cache(policy, query, mask)
        assert cache.get_seq_length() == query.shape[1] - 1
        last = policy(input_ids=query[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                      cache=cache).logits[:, -1]
        assert torch.allclose(last, full, atol=1e-4)
        greedy = dict(input_ids=query, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                      eos_token_id=tok.eos_token_id)
        plain = policy.generate(**greedy)
        prefilled = policy.generate(**greedy, cache=rollout.prefill_cache(policy, query, mask, 6))
    assert torch.equal(plain, prefilled)
    assert rollout.prefill_cache(policy, torch.tensor([[7]]), torch.tensor([[1]])) is None  # nothing before the last


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_generation_folds_the_adapter_in_and_leaves_the_reference_weights_untouched(name, models_dir):
    from edgerlhf.core.models import prepare_base_model

    location = prepare_base_model(name, models_dir)
    policy, _ = tiny_policy(location)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    weights = {n: (p, p.detach().clone()) for n, p in policy.named_parameters() if "lora_" not in n}
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        with_adapter = policy(input_ids=ids).logits
        with policy.disable_adapter():
            reference = policy(input_ids=ids).logits
        with rollout.merged_adapter(policy):
            merged = policy(input_ids=ids).logits
        after = policy(input_ids=ids).logits
    assert torch.allclose(merged, with_adapter, atol=1e-5) and not torch.allclose(merged, reference, atol=1e-3)
    assert torch.equal(after, with_adapter)
    for n, p in policy.named_parameters():
        if "lora_" not in n:
            assert p is weights[n][0] and torch.equal(p, weights[n][1]), n  # the same tensors, bit for bit


def trained_eos_prone_policy(name, models_dir):
    """The tokenizer, an :func:`eos_prone_policy` with a random (trained-looking) adapter, and a random value head:
    replies end at different lengths and the policy differs from the reference."""
    from edgerlhf.core.models import prepare_base_model

    location = prepare_base_model(name, models_dir)
    tok = load_tokenizer(location)
    policy, head = eos_prone_policy(location, tok.eos_token_id, bias=0.7 * (math.log(len(tok)) - 1.5))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        torch.nn.init.normal_(head.weight)
    return tok, policy, head


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_log_probs_and_values_from_the_generation_pass_match_the_recomputed_ones(name, models_dir):
    tok, policy, head = trained_eos_prone_policy(name, models_dir)
    torch.manual_seed(4)
    ro = rollout.rollout(policy, queries_for(tok, 5), ppo_pad(tok), tok.eos_token_id, 7, 0.7, 0, 1.0, value_head=head,
                     from_generation=True)
    mask = ro["response_mask"]
    assert ro["ended"].any() and mask.sum(dim=1).unique().numel() > 1
    again = full_forward(policy, head, ro)
    for key in ("logprobs", "values"):
        assert torch.allclose(ro[key] * mask, again[key] * mask, atol=1e-5), key


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("lengths", [(3, 6, 4, 5, 3), (1, 1, 1)], ids=["prompts", "one-token-prompts"])
def test_old_log_probs_from_the_reply_pass_over_the_prompt_cache_match_a_full_forward(name, lengths, models_dir):
    """The rollout's old log-probs and values come from a pass over the reply tokens that reuses the prompt's
    cached keys and values: they must equal a forward pass over query + reply with the adapter on (and not the
    reference), for replies of different lengths, generation chunks, and prompts with nothing to cache."""
    tok, policy, head = trained_eos_prone_policy(name, models_dir)
    queries = [list(range(7, 7 + n)) for n in lengths]
    torch.manual_seed(4)
    ro = rollout.rollout(policy, queries, ppo_pad(tok), tok.eos_token_id, 7, 0.7, 0, 1.0, chunk_size=2, value_head=head)
    mask = ro["response_mask"]
    assert ro["time_old_logprobs_s"] > 0
    full = full_forward(policy, head, ro)
    for key in ("logprobs", "values"):
        assert torch.allclose(ro[key] * mask, full[key] * mask, atol=1e-5), key
    assert not torch.allclose(ro["logprobs"] * mask, full["ref_logprobs"] * mask, atol=1e-3)  # the policy's
    if len(set(lengths)) > 1:
        assert ro["ended"].any() and mask.sum(dim=1).unique().numel() > 1  # replies of different lengths
    if ro["query"].shape[1] > 1:  # without the prompt's cache, a query wider than one token is refused
        with pytest.raises(ValueError, match="prefill_cache"):
            rollout.reply_logprobs(policy, head, ro["query"], ro["query_mask"], ro["response"], mask, 0.7)


def test_a_step_with_log_probs_from_generation_starts_at_ratio_one(tiny_gpt2, tmp_path):
    cfg = PPOStageConfig(**{**CFG.__dict__, "steps": 1, "micro_batch_size": 4, "gradient_accumulation_steps": 1,
                       "ppo_epochs": 1, "logprobs_from_generation": True})
    history, _, _ = run_loop(tiny_gpt2, tmp_path, cfg)
    assert history[0]["optimizer_steps"] == 1 and history[0]["clipfrac"] == 0.0
    assert abs(history[0]["approx_kl"]) < 1e-7  # the generation's log-probs are the policy's


def test_steps_are_logged_under_trls_metric_names(tiny_gpt2, tmp_path, caplog):
    import logging

    from edgerlhf.core.logs import configure_logging
    from edgerlhf.core.ppo_trainer import TRL_METRIC_NAMES, trl_metrics
    from edgerlhf.core.templates import ensure_pad_token

    policy, head = tiny_policy(tiny_gpt2)
    tok = load_tokenizer(tiny_gpt2)
    ensure_pad_token(tok)
    queries = queries_for(tok, 4)
    configure_logging("INFO")
    with caplog.at_level(logging.INFO, logger="edgerlhf"):
        history = train(policy, head, tok, queries, [[{"role": "user", "content": "q"}]] * 4,
                        lambda p, r: torch.ones(len(r)), dataclasses_replace(CFG, steps=1), tmp_path / "ck", seed=0)
    metrics = trl_metrics(history[0])
    assert list(metrics) == list(TRL_METRIC_NAMES.values())  # every statistic named, in TRL's terms
    assert metrics["objective/kl"] == history[0]["kl"] and metrics["policy/approxkl_avg"] == history[0]["approx_kl"]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "edgerlhf.core.ppo_trainer"]
    assert line.startswith("PPO step 1/1: objective/scores 1, objective/kl ") and "loss/policy_avg" in line


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------- stage 4's evaluation

def test_a_direction_is_concluded_only_where_every_judge_finds_it_after_holm():
    from edgerlhf.ppo_alignment import holm_direction

    def t(diff, p):
        return {"mean_difference": diff, "p_holm": p}
    assert holm_direction({"judge": t(0.2, 0.01), "judge-tfidf": t(0.1, 0.04)}) == 1
    assert holm_direction({"judge": t(-0.2, 0.01), "judge-tfidf": t(-0.1, 0.001)}) == -1
    assert holm_direction({"judge": t(0.2, 0.01), "judge-tfidf": t(0.1, 0.06)}) == 0  # one not detectable
    assert holm_direction({"judge": t(0.2, 0.01), "judge-tfidf": t(-0.1, 0.01)}) == 0  # they point apart


def test_the_implicit_reward_check_counts_the_pairs_where_the_policy_raised_the_chosen_reply(tiny_gpt2):
    from edgerlhf.core.lm import completion_logprobs
    from edgerlhf.core.templates import ensure_chat_template
    from edgerlhf.ppo_alignment import implicit_reward_check, preference_margins

    # h = policy - SFT margin = [1, 0, -1, 1]: 2 raised, 1 tie (counts half), 1 lowered
    out = implicit_reward_check([1.0, 0.5, -1.0, 0.0], [0.0, 0.5, 0.0, -1.0], seed=0)
    assert out["share_chosen_raised"] == pytest.approx(2.5 / 4) and out["ties"] == 1 and out["n"] == 4
    assert out["sign_test_p"] == pytest.approx(1.0)  # exact two-sided binomial test of 2 of 3 untied pairs
    assert out["mean_nats"]["mean_difference"] == pytest.approx(0.25)
    policy, _ = tiny_policy(tiny_gpt2)
    tok = gpt2_tokenizer_with_pad(tiny_gpt2)
    ensure_chat_template(tok)
    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": "yes indeed " * (i + 1),
             "rejected": "no"} for i in range(3)]
    margins = preference_margins(policy, tok, rows, batch_size=2)  # batched and reordered by length
    one_by_one = [float(completion_logprobs(policy, tok, [(r["prompt"], r["chosen"])])[0][0]
                        - completion_logprobs(policy, tok, [(r["prompt"], r["rejected"])])[0][0]) for r in rows]
    assert margins.tolist() == pytest.approx(one_by_one, abs=1e-4)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_pair_log_probs_with_the_prompt_run_once_equal_two_full_passes(name, models_dir):
    """The shared prompt's cache reused for both replies gives each reply the log-probability of its own full
    pass, also for replies that begin alike, prompts of unequal length and odd batch sizes; the adapter is on."""
    from edgerlhf.core.models import prepare_base_model
    from edgerlhf.core.templates import ensure_chat_template

    location = prepare_base_model(name, models_dir)
    policy, _ = tiny_policy(location)
    for module in policy.modules():  # a non-zero adapter, so the pass must go through it
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    tok = gpt2_tokenizer_with_pad(location)
    ensure_chat_template(tok)
    prompts = [[{"role": "user", "content": "hi " * (i + 1)}] for i in range(5)]
    chosen = ["yes sure " * (i % 3 + 1) for i in range(5)]
    rejected = ["no" + " way" * i for i in range(4)] + ["yes sure no"]  # the last pair begins alike
    for batch_size in (1, 3, 4):
        c, r = lm.pair_logprobs(policy, tok, prompts, chosen, rejected, batch_size)
        full_c, _ = lm.completion_logprobs(policy, tok, list(zip(prompts, chosen)), batch_size=1)
        full_r, _ = lm.completion_logprobs(policy, tok, list(zip(prompts, rejected)), batch_size=1)
        assert torch.allclose(c, full_c, atol=1e-4) and torch.allclose(r, full_r, atol=1e-4), batch_size
    with pytest.raises(ValueError, match="one of each per prompt"):
        lm.pair_logprobs(policy, tok, prompts, chosen, rejected[:4])


def test_sample_views_show_gains_losses_and_random_replies_with_their_length_change():
    from edgerlhf.ppo_alignment import sample_views

    samples = [{"prompt": f"p{i}", "sft": "a", "ppo": "b", "sft_tokens": 10, "ppo_tokens": 10 + i,
                "judge_sft": 0.0, "judge_ppo": float(i - 4)} for i in range(10)]
    views = sample_views(samples, k=2, seed=0)
    assert [v["shown"] for v in views] == ["largest judge gain"] * 2 + ["largest judge loss"] * 2 + ["random"] * 2
    assert [v["prompt"] for v in views[:4]] == ["p9", "p8", "p0", "p1"]
    assert {v["prompt"] for v in views[4:]} <= {f"p{i}" for i in range(2, 8)} and len({v["prompt"] for v in views}) == 6
    assert views[0]["judge_change"] == 5.0 and views[0]["length_change"] == 9
    assert [v["prompt"] for v in sample_views(samples[:3], k=2)] == ["p2", "p1", "p0"]  # few samples: none twice
    with pytest.raises(KeyError):
        sample_views(samples, judge="judge-tfidf")
