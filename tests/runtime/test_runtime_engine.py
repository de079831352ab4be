"""The batched engine without sockets: packed steps equal solo runs; scheduling; isolation.

Steps are driven by hand (an engine without its thread), so which forwards share a step is
exact, not a matter of timing.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from runtime_kit import FAMILIES, WINDOW, family_config, random_prompt
from transformers import AutoModelForCausalLM

from splitllm.runtime.engine import Engine, EngineConfig, Job, Outcome
from splitllm.runtime.metrics import ServerMetrics
from splitllm.runtime.models import LoadedModel
from splitllm.runtime.protocol import (
    ForwardHeader,
    ProtocolError,
    Sampling,
    encode_tensor,
    parse_binary,
)
from splitllm.runtime.session import ForwardResult, Limits, ServerSession
from splitllm.runtime.step import StepRow, run_step
from splitllm.runtime.units import SegmentCache, UnitStack

ATOL = 1e-4


def solo(stack: UnitStack, row: StepRow, cache: SegmentCache | None) -> torch.Tensor:
    """The same row run alone through the one-session path (the model's own masks)."""
    return stack.run(row.start, row.stop, row.x, row.position_ids, cache)


def test_a_rows_position_ids_are_the_consecutive_run_from_its_first_position() -> None:
    """Token ids from embed or hidden states from a client: positions first .. first + t - 1,
    integers on the row's device (what embeddings and rotary tables index with)."""
    ids = StepRow(0, 6, torch.tensor([[11, 12, 13, 14]]), 7, None)
    hidden = StepRow(3, 6, torch.zeros(1, 3, 8), 0, None)
    one = StepRow(0, 6, torch.tensor([[5]]), 41, None)
    assert ids.position_ids.tolist() == [[7, 8, 9, 10]]
    assert hidden.position_ids.tolist() == [[0, 1, 2]]
    assert one.position_ids.tolist() == [[41]]
    for row in (ids, hidden, one):
        assert row.position_ids.dtype == torch.int64 and row.position_ids.device == row.x.device


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_steps_equal_solo_runs(family: str) -> None:
    """Mixed segments, prompt lengths, chunks; rows joining and leaving between steps; every
    family (sliding windows shorter than the contexts, local/global layers, soft-capping)."""
    torch.manual_seed(0)
    stack = UnitStack(AutoModelForCausalLM.from_config(family_config(family)).eval())
    n = stack.n_units  # 6: embed, 4 blocks, head
    gen = torch.Generator().manual_seed(3)
    # (start, stop, first step, last step, prompt tokens)
    specs = [(0, n, 0, 7, 7), (2, n, 0, 3, 5), (0, 3, 1, 7, 9), (3, 5, 2, 7, 4),
             (1, n - 1, 0, 7, 1)]
    caches = [stack.new_cache(a, b, grown_in_blocks=True) for a, b, *_ in specs]  # the server's
    solo_caches = [stack.new_cache(a, b) for a, b, *_ in specs]
    positions = [0] * len(specs)
    for step in range(8):
        rows, members = [], []
        for k, (start, stop, first, last, prompt) in enumerate(specs):
            if not first <= step <= last:
                continue
            tokens = prompt if step == first else (3 if step == 3 else 1)  # step 3: a chunk
            x = (torch.randint(3, 300, (1, tokens), generator=gen) if start == 0
                 else torch.randn(1, tokens, stack.hidden_size, generator=gen))
            rows.append(StepRow(start, stop, x, positions[k], caches[k]))
            members.append(k)
            positions[k] += tokens
        outputs, times = run_step(stack, rows)
        assert len(outputs) == len(rows) >= 2
        assert max(times.unit_tokens.values()) > 1
        for row, k, output in zip(rows, members, outputs, strict=True):
            assert output.error is None
            torch.testing.assert_close(output.out, solo(stack, row, solo_caches[k]),
                                       atol=ATOL, rtol=0)
    assert max(positions) > 2 * WINDOW  # the windows slid


class Driver:
    """An engine without its thread, and sessions whose forwards are queued by hand."""

    def __init__(self, loaded: LoadedModel, **config: Any) -> None:
        self.stack = UnitStack(loaded.model)
        self.metrics = ServerMetrics(self.stack.names)
        self.engine = Engine(self.stack, self.metrics, EngineConfig(**config), threads=1,
                             start=False)
        self.outcomes: dict[tuple[str, int], Outcome] = {}
        self.seq = 0

    def open(self, name: str, placement: str, seed: int | None = None) -> ServerSession:
        return ServerSession.open(name, self.stack, placement, torch.float32,
                                  Sampling(temperature=0.8 if seed else 0.0, seed=seed), Limits())

    def submit(self, session: ServerSession, units: tuple[int, int], positions: tuple[int, int],
               x: torch.Tensor, **fields: Any) -> int:
        self.seq += 1
        frame = encode_tensor({"type": "forward", "session": session.session_id, "seq": self.seq,
                               "units": list(units), "positions": list(positions),
                               "return_logits": True, **fields}, x)
        header, payload = parse_binary(frame)
        assert isinstance(header, ForwardHeader)
        key = (session.session_id, self.seq)
        self.engine.put(Job(session, header, payload,
                            lambda outcome: self.outcomes.__setitem__(key, outcome)))
        return self.seq

    def result(self, session: ServerSession, seq: int) -> ForwardResult:
        outcome = self.outcomes[(session.session_id, seq)]
        assert isinstance(outcome, ForwardResult), outcome
        return outcome

    def step(self) -> None:
        self.engine.step()


def reference_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Next-token logits [1, V] of the unsplit model after `ids`."""
    with torch.inference_mode():
        return loaded.model(torch.tensor([ids])).logits[:, -1].float()


def test_chunked_prefill_under_the_budget_and_decode_first(tiny_llama: LoadedModel) -> None:
    drv = Driver(tiny_llama, max_batch_tokens=8)
    rng = random.Random(5)
    long_prompt, short_prompt = random_prompt(rng, 30), random_prompt(rng, 3)
    a, b = drv.open("a", "SSSSSS"), drv.open("b", "SSSSSS")
    seq_b = drv.submit(b, (0, 6), (0, 3), torch.tensor([short_prompt]))
    drv.step()  # b's prompt alone
    token_b = drv.result(b, seq_b).token
    assert token_b is not None
    seq_a = drv.submit(a, (0, 6), (0, 30), torch.tensor([long_prompt]))
    decoded = [[*short_prompt, token_b]]
    for step in range(4):  # 30 prompt tokens at 7 per step (one slot goes to b's decode row)
        seq_b = drv.submit(b, (0, 6), (3 + step, 4 + step), torch.tensor([[decoded[-1][-1]]]))
        drv.step()
        got = drv.result(b, seq_b)  # decode never waits behind the prompt
        torch.testing.assert_close(got.logits, reference_logits(tiny_llama, decoded[-1]),
                                   atol=ATOL, rtol=0)
        assert got.token is not None
        decoded.append([*decoded[-1], got.token])
        assert (a.session_id, seq_a) not in drv.outcomes  # the prompt is still in chunks
    drv.step()  # the last 2 prompt tokens
    done = drv.result(a, seq_a)
    torch.testing.assert_close(done.logits, reference_logits(tiny_llama, long_prompt),
                               atol=ATOL, rtol=0)
    assert drv.metrics.steps == 6
    assert drv.metrics.step_tokens.total == 3 + 4 * 8 + 2
    assert drv.metrics.step_rows.total == 1 + 4 * 2 + 1


def test_forwards_of_one_segment_run_in_order(tiny_llama: LoadedModel) -> None:
    """Two prompt chunks of one session queued back to back: never in the same step."""
    drv = Driver(tiny_llama)
    prompt = random_prompt(random.Random(6), 10)
    s = drv.open("s", "SSSSSS")
    first = drv.submit(s, (0, 6), (0, 6), torch.tensor([prompt[:6]]))
    second = drv.submit(s, (0, 6), (6, 10), torch.tensor([prompt[6:]]))
    drv.step()
    assert (s.session_id, second) not in drv.outcomes
    drv.step()
    assert drv.result(s, first).token is not None
    torch.testing.assert_close(drv.result(s, second).logits, reference_logits(tiny_llama, prompt),
                               atol=ATOL, rtol=0)


def test_a_bad_forward_never_disturbs_the_others(tiny_llama: LoadedModel,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    drv = Driver(tiny_llama)
    rng = random.Random(7)
    prompts = [random_prompt(rng, 4 + k) for k in range(4)]
    sessions = [drv.open(f"s{k}", "SSSSSS") for k in range(4)]
    bad_positions = drv.submit(sessions[0], (0, 6), (2, 6), torch.tensor([prompts[0]]))
    seqs = [drv.submit(s, (0, 6), (0, len(p)), torch.tensor([p]))
            for s, p in zip(sessions[1:], prompts[1:], strict=True)]
    broken = sessions[3].segments[0].cache
    assert broken is not None

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("attention failed for this session")

    for layer in broken.layers:  # fails inside the step, on the fused path or the model's
        monkeypatch.setattr(layer, "reserve", fail)
    drv.step()
    rejected = drv.outcomes[(sessions[0].session_id, bad_positions)]
    assert isinstance(rejected, ProtocolError) and rejected.code == "bad_positions"
    assert isinstance(drv.outcomes[(sessions[3].session_id, seqs[2])], RuntimeError)
    for session, seq, prompt in zip(sessions[1:3], seqs[:2], prompts[1:3], strict=True):
        torch.testing.assert_close(drv.result(session, seq).logits,
                                   reference_logits(tiny_llama, prompt), atol=ATOL, rtol=0)
    assert drv.metrics.steps == 1 and drv.metrics.step_rows.total == 3


def test_a_long_wait_is_served_first(tiny_llama: LoadedModel) -> None:
    """No starvation: with one row per step, the oldest forward is not passed over forever."""
    drv = Driver(tiny_llama, max_batch_rows=1)
    rng = random.Random(8)
    waiting = drv.open("w", "SSSSSS")
    seq = drv.submit(waiting, (0, 6), (0, 5), torch.tensor([random_prompt(rng, 5)]))
    busy = [drv.open(f"d{k}", "SSSSSS") for k in range(2)]
    for s in busy:  # decode rows would always win over a prompt by kind alone
        drv.submit(s, (0, 6), (0, 1), torch.tensor([random_prompt(rng, 1)]))
    steps = 0
    while (waiting.session_id, seq) not in drv.outcomes:
        for s in busy:
            if not any(j.session is s for j in drv.engine.queue):
                p = s.segments[0].cache.get_seq_length()  # type: ignore[union-attr]
                drv.submit(s, (0, 6), (p, p + 1), torch.tensor([random_prompt(rng, 1)]))
        drv.step()
        steps += 1
        assert steps <= 10


def test_the_server_announces_its_measured_step_model(llama_server: Any) -> None:
    import httpx

    from splitllm.stepmodel import StepModel

    info = httpx.get(llama_server.http_url + "/v1/info", timeout=20).json()
    model = StepModel.from_json(info["step_model"])
    assert model.n_blocks == 4 and info["compute"] == "cpu"
    assert info["engine"] == {"max_batch_tokens": 512, "max_batch_rows": 64}
    for fit in (model.embed, model.block, model.head):  # measured at several token counts
        assert len(fit.points) >= 3 and all(s >= 0 for _, s in fit.points)
    assert model.step_s(16, 16) > 0


def test_step_model_fit_and_costs_under_batching() -> None:
    from splitllm.stepmodel import StepModel, UnitFit, decode_share_s, fit_unit, marginal_decode_s

    fit = fit_unit([(16, 0.0026), (1, 0.0011), (4, 0.0014), (64, 0.0074)])
    assert fit.points == ((1, 0.0011), (4, 0.0014), (16, 0.0026), (64, 0.0074))
    assert fit.line_at(10) == pytest.approx((0.001, 1e-4))  # the segment 4-16
    model = StepModel(UnitFit.line(0.0, 1e-6), fit, UnitFit.line(0.002, 1e-4), n_blocks=10)
    assert StepModel.from_json(model.to_json()) == model
    shares = [decode_share_s(model, c) for c in (1, 4, 16, 64)]
    assert shares == sorted(shares, reverse=True)  # weights amortised over the batch
    assert shares[0] == pytest.approx(model.step_s(1, 1))
    # The marginal request pays only its per-token work, not the shared weight reads.
    assert marginal_decode_s(model, 16) == pytest.approx(1e-6 + 10 * 1e-4 + 1e-4)


def test_a_step_curve_follows_its_points_and_never_lets_more_work_look_cheaper() -> None:
    from splitllm.stepmodel import UnitFit, fit_unit

    # The few-row kernel: flat to 6 rows, then MKL's steeper line; a line through all of them
    # would put one row too high.
    kernel = fit_unit([(1, 1.0e-3), (4, 1.1e-3), (8, 1.6e-3), (16, 2.4e-3), (1, 1.0e-3)])
    assert kernel.seconds(1) == pytest.approx(1.0e-3)
    assert kernel.seconds(6) == pytest.approx(1.35e-3)  # between 4 and 8
    assert kernel.seconds(32) == pytest.approx(4.0e-3)  # the last segment, extended
    assert kernel.seconds(0) == pytest.approx(1.0e-3 - 0.1e-3 / 3)  # the first, extended
    # Noise: 4 rows measured faster than 1 is pooled, not believed.
    noisy = fit_unit([(1, 2.0e-3), (4, 1.0e-3), (16, 5.0e-3)])
    assert noisy.points == ((1, 1.5e-3), (4, 1.5e-3), (16, 5.0e-3))
    assert UnitFit.line(0.5, 0.25).seconds(4) == pytest.approx(1.5)
    assert UnitFit.from_json({"fixed_s": 0.5, "per_token_s": 0.25}) == UnitFit.line(0.5, 0.25)
    assert UnitFit.from_json(kernel.to_json()) == kernel


def test_a_step_curve_extends_beyond_its_longest_step_by_the_secant_over_its_upper_half() -> None:
    from splitllm.stepmodel import UnitFit, fit_unit

    # A live refit's counts 127 and 128 (a load test's, 2026-12-02): pooled equal, their
    # segment priced every token beyond 128 at nothing; 0.19 ms apart, at 4.5x the curve's
    # 0.042 ms. The secant from 32 tokens (the last point at half of 128 or below) holds both.
    for top in (6.1e-3, 6.29e-3):
        curve = fit_unit([(1, 0.46e-3), (32, 2.1e-3), (127, 6.1e-3), (128, top)])
        slope = (top - 2.1e-3) / 96
        assert 0.04e-3 < slope < 0.045e-3
        assert curve.line_at(256) == pytest.approx((top - 128 * slope, slope))
        assert curve.seconds(256) == pytest.approx(top + 128 * slope)
        assert curve.seconds(127.5) == pytest.approx((6.1e-3 + top) / 2)  # within: its points
    flat = fit_unit([(1, 1e-3), (4, 1e-3)])  # no point at half or below: the first one's
    assert flat.seconds(64) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="distinct ascending tokens"):
        UnitFit(((4, 1.0), (1, 2.0)))
