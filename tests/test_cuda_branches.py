"""The CUDA-only branches, exercised on a CPU with a mocked card (issue 14: 00_Setup crashed on every CUDA device
because ``torch.device("cuda")`` carries no index). The mock keeps torch's own argument checks: every call that
torch validates with ``_get_device_index`` is validated the same way here, so a bare ``"cuda"`` where torch
wants an index fails in CI as it would on a GPU. The real thing runs in the ``gpu``-marked tests."""
from types import SimpleNamespace

import pytest
import torch
from accelerate import PartialState
from torch.cuda._utils import _get_device_index

from edgerlhf.core.adapters import compute_dtype
from edgerlhf.ppo_alignment import isolated_rng
from edgerlhf.core.hardware import hardware_report, recommend, resolve_device
from edgerlhf.core.stage import begin
from edgerlhf.core.training import trainer_arguments

CARD_GIB = 24


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two visible 24 GiB cards, current device 0; returns the list of ``(call, device index)`` made."""
    calls = []

    def props(device=None):
        index = _get_device_index(device, optional=True)  # as torch.cuda.get_device_properties
        assert 0 <= index < 2, "Invalid device id"
        return SimpleNamespace(name=f"Fake RTX {index}", total_memory=CARD_GIB * 2**30)

    def fraction(value, device=None):
        calls.append(("set_per_process_memory_fraction", _get_device_index(device)))  # no bare "cuda" here

    def rng_state(device="cuda"):
        calls.append(("get_rng_state", _get_device_index(device, optional=True)))
        return torch.zeros(16, dtype=torch.uint8)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fraction)
    monkeypatch.setattr(torch.cuda, "get_rng_state", rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(
        ("set_rng_state", _get_device_index(device, optional=True))))
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    for name in ("max_memory_allocated", "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    PartialState._reset_state()  # accelerate's process state is a singleton: not made on the mocked card
    yield calls
    PartialState._reset_state()


def test_a_cuda_device_always_resolves_with_its_index(fake_cuda, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")  # accelerate launch / torchrun: one card per process
    assert resolve_device("auto") == torch.device("cuda", 1)


def test_a_cuda_device_without_torch_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")


def test_a_stage_begins_on_the_card_with_the_vram_cap(fake_cuda, tiny_cfg):
    # the crash of issue 14: begin() -> apply_vram_budget(8 GiB) on the device "auto" resolves to
    ctx = begin(tiny_cfg(**{"run.device": "auto", "run.vram_budget_gib": 8.0}), starts_run=True)
    assert ctx.device == torch.device("cuda", 0)
    assert ctx.budget["applied"] is True and ctx.budget["fraction"] == pytest.approx(8 / CARD_GIB)
    assert ("set_per_process_memory_fraction", 0) in fake_cuda


def test_the_hardware_report_and_the_recommendation_read_the_card(fake_cuda, tmp_path):
    report = hardware_report("auto", tmp_path)
    assert report["device"] == "cuda:0" and report["gpu_name"] == "Fake RTX 0" and report["gpu_count"] == 2
    assert report["vram_total_mib"] == CARD_GIB * 1024 and report["bf16_supported"] is True
    assert recommend(report)["profile"] == "full"


def test_trainers_get_bf16_on_the_card_and_never_use_cpu(fake_cuda, tiny_cfg, tmp_path):
    device = resolve_device("auto")
    assert compute_dtype(device) == torch.bfloat16
    args = trainer_arguments(tiny_cfg().sft, tmp_path, device, seed=42, metric="eval_loss")
    assert args["bf16"] is True and args["use_cpu"] is False and args["fp16"] is False
    cpu = trainer_arguments(tiny_cfg().sft, tmp_path, torch.device("cpu"), seed=42, metric="eval_loss")
    assert cpu["bf16"] is False and cpu["use_cpu"] is True


def test_evaluation_restores_the_rng_of_the_card_it_runs_on(fake_cuda, monkeypatch):
    """The card's stream (a stored state, as torch.cuda keeps one per device) and the CPU stream are where they
    were before the evaluation; inside it, the CPU stream is the evaluation's seed."""
    card = {0: torch.arange(16, dtype=torch.uint8), 1: torch.zeros(16, dtype=torch.uint8)}

    def get(device="cuda"):
        return card[_get_device_index(device, optional=True)].clone()

    def put(state, device="cuda"):
        card[_get_device_index(device, optional=True)] = state.clone()

    monkeypatch.setattr(torch.cuda, "get_rng_state", get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", put)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    before = card[0].clone()
    with isolated_rng(7, resolve_device("cuda")):
        inside = torch.rand(3)
        card[0] = torch.full((16,), 99, dtype=torch.uint8)  # the evaluation's draws on the card move its stream
    assert torch.equal(card[0], before) and torch.equal(card[1], torch.zeros(16, dtype=torch.uint8))
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(7)
    assert torch.equal(inside, torch.rand(3))


def test_training_on_the_card_takes_the_micro_batch_the_planner_fits(fake_cuda, tiny_cfg, tiny_gpt2, monkeypatch):
    from edgerlhf.core.stage import choose_micro_batch

    free = {"bytes": 20 * 2**30}

    def mem_get_info(device=None):
        fake_cuda.append(("mem_get_info", _get_device_index(device)))  # as torch.cuda.mem_get_info
        return free["bytes"], CARD_GIB * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2**30)
    cfg = tiny_cfg(**{"run.device": "cuda", "run.vram_budget_gib": 8.0, "sft.per_device_train_batch_size": 1,
                      "sft.gradient_accumulation_steps": 8})
    ctx = begin(cfg, starts_run=True)
    chosen, choice = choose_micro_batch(ctx, "sft", tiny_gpt2)
    assert choice["available_mib"] == 8 * 1024  # the cap, below what the card has free
    assert ("mem_get_info", 0) in fake_cuda
    assert choice["micro_batch"] == 8 and choice["accumulation"] == 1  # a tiny model: the whole batch fits
    assert (chosen.sft.per_device_train_batch_size, chosen.sft.gradient_accumulation_steps) == (8, 1)
    assert ctx.cfg.sft.per_device_train_batch_size == 1  # the recorded config keeps what was asked for
    free["bytes"] = 0  # another process holds the card: only this process's own 1 GiB remains
    assert choose_micro_batch(ctx, "sft", tiny_gpt2)[1]["available_mib"] == 1024
    ctx.cfg.run.auto_micro_batch = False
    assert choose_micro_batch(ctx, "sft", tiny_gpt2) == (ctx.cfg, None)


def test_on_a_cpu_the_configured_micro_batch_stands(tiny_cfg, tiny_gpt2):
    from edgerlhf.core.stage import choose_micro_batch

    ctx = begin(tiny_cfg(**{"run.device": "cpu"}), starts_run=True)
    assert choose_micro_batch(ctx, "sft", tiny_gpt2) == (ctx.cfg, None)
