"""The serving engine against independent references: each request decoded alone by
`infer.generate.Generator`, and a chat that prefills its whole conversation at every turn."""

import io
import logging

import equinox as eqx
import jax
import numpy as np
import pytest

import infer.engine as engine_module
from hpllm.config import preset
from hpllm.model import Transformer
from hpllm.tokenizer import Tokenizer
from infer.chat import Chat
from infer.engine import FINISH_CANCELLED, Engine, QueueFullError, Request
from infer.generate import Generator
from infer.sampling import SamplingConfig

TINY = preset("tiny")
CONTEXT = 64


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(TINY, key=jax.random.key(0))


def _prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, TINY.vocab_size, length).tolist()


def test_slots_join_and_leave_without_recompiling_and_match_each_request_alone(
        model, monkeypatch, caplog):
    prefill = eqx.filter_jit(eqx.debug.assert_max_traces(
        engine_module.prefill_slots.__wrapped__, max_traces=len(
            engine_module.prefill_shapes(CONTEXT, 3))), donate="all-except-first")
    prefilled_rows = []

    def counted_prefill(model, state, slots, *args):
        prefilled_rows.append(len(slots))
        return prefill(model, state, slots, *args)

    monkeypatch.setattr(engine_module, "prefill_slots", counted_prefill)
    decode = eqx.filter_jit(eqx.debug.assert_max_traces(
        engine_module.decode_first_rows.__wrapped__, max_traces=len(
            engine_module.row_buckets(3))), donate="all-except-first")
    decoded_rows = []

    def counted_decode(model, state, rows, *args):
        decoded_rows.append(rows)
        return decode(model, state, rows, *args)

    monkeypatch.setattr(engine_module, "decode_first_rows", counted_decode)
    engine = Engine(model, max_batch=3, context=CONTEXT, chunk_size=3)
    engine.warm_up()  # every shape the engine runs; anything traced later would raise
    # Nor may the host's own array building compile anything (an eager op compiles per shape).
    caplog.set_level(logging.WARNING)
    with jax.log_compiles():
        # A lone request decodes over one row, not over every slot.
        decoded_rows.clear()
        engine.submit(Request(_prompt(9, 4), 5, lambda ids, finish: None))
        engine.run_until_idle()
        assert set(decoded_rows) == {1}
        engine.finished.clear()
        # 7 requests on 3 slots: they queue, join between chunks and leave at their own
        # lengths.
        prompts = [_prompt(i, 3 + 6 * i) for i in range(7)]
        budgets = [20 - 2 * i for i in range(7)]
        requests = [Request(p, n, lambda ids, finish: None) for p, n in zip(prompts, budgets,
                                                                            strict=True)]
        for request in requests:
            engine.submit(request)
        prefilled_rows.clear()
        engine.run_until_idle()
    assert not [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    # The first three (all padded to 16 tokens) fill the three slots in one prefill.
    assert prefilled_rows[0] == 3
    alone = Generator(model, context=CONTEXT)
    for request, prompt, budget in zip(requests, prompts, budgets, strict=True):
        assert request.generated == alone.generate([prompt], max_new_tokens=budget)[0]
    assert engine.finished["length"] == 7
    # A prompt that extends a finished one reuses that slot's cache.
    follow = requests[6].prompt + requests[6].generated + [5, 6]
    again = Request(follow, 6, lambda ids, finish: None)
    engine.submit(again)
    engine.run_until_idle()
    assert again.cached == len(requests[6].prompt) + len(requests[6].generated) - 1
    assert again.generated == alone.generate([follow], max_new_tokens=6)[0]


def test_cancelled_and_queued_requests_leave_and_a_full_queue_refuses(model):
    engine = Engine(model, max_batch=1, max_queue=1, context=CONTEXT, chunk_size=2)
    reasons = []
    running = Request(_prompt(0, 5), 40, lambda ids, finish: reasons.append(finish))
    waiting = Request(_prompt(1, 5), 40, lambda ids, finish: reasons.append(finish))
    engine.submit(running)
    engine.submit(waiting)
    with pytest.raises(QueueFullError):
        engine.submit(Request(_prompt(2, 5), 4, lambda ids, finish: None))
    engine.step()
    assert engine.running == 1 and engine.queued == 1
    running.cancel()
    waiting.cancel()
    engine.step()
    assert engine.running == 0 and engine.queued == 0
    assert reasons.count(FINISH_CANCELLED) == 2 and engine.finished[FINISH_CANCELLED] == 2
    assert len(running.generated) < 40


def test_chat_with_cache_reuse_replies_as_a_fresh_prefill_of_the_whole_conversation(model):
    tokenizer = Tokenizer.train(["the cat sat on the mat", "a dog ran in the park"] * 5,
                                vocab_size=300)
    chats = [Chat(model, tokenizer, sampling=SamplingConfig(greedy=True), max_new_tokens=6,
                  reuse_cache=reuse) for reuse in (True, False)]
    cached = []
    for text in ("the cat", "a dog ran", "in the park", "the mat"):
        for chat in chats:
            chat.reply(text, io.StringIO(), io.StringIO())
        cached.append(chats[0].last_cached)
    assert [t.reply for t in chats[0].history] == [t.reply for t in chats[1].history]
    # From the second turn on, only the new turn is prefilled.
    assert cached[0] == 0
    assert all(c > 0 for c in cached[1:]) and cached == sorted(cached)
    assert chats[1].last_cached == 0


def test_queued_requests_prefill_together_as_their_padded_lengths_allow(model):
    engine = Engine(model, max_batch=8, context=128)
    # Lengths 5..16 pad to 16, 17..32 to 32, ...; several rows of one length share a call of
    # at most `PREFILL_TOKENS` padded tokens.
    assert engine.prefill_groups([5, 40, 16, 3, 9, 100, 7, 30]) == [
        [0, 2, 3, 4], [6], [7], [1], [5]]
    # 16 rows of 128 would be 2048 tokens: 8 rows at most.
    wide = Engine(model, max_batch=16, context=128)
    assert wide.prefill_groups([100] * 17) == [list(range(8)), list(range(8, 16)), [16]]
    # A call takes padding rows, at most as many as the calls it saves: 7 rows go in one call
    # of 8 (not 4 + 2 + 1), 3 in one of 4 (not 2 + 1), 15 in one of 16; 5 stay 4 + 1.
    assert wide.prefill_groups([20] * 7) == [list(range(7))]
    assert wide.prefill_groups([20] * 3) == [[0, 1, 2]]
    assert wide.prefill_groups([20] * 15) == [list(range(15))]
    assert wide.prefill_groups([20] * 5) == [[0, 1, 2, 3], [4]]
    assert wide.prefill_groups([20] * 13) == [list(range(8)), list(range(8, 12)), [12]]


def test_padding_rows_of_a_prefill_call_write_nothing(model, monkeypatch):
    # One request decoding in slot 0, then three queued ones: they share one prefill call of
    # four rows, one of them padding (past the last slot, so dropped). Every reply, the
    # running one's too, is the reply of the same request alone.
    engine = Engine(model, max_batch=4, context=CONTEXT, chunk_size=2)
    prompts = [_prompt(20 + i, 4 + 3 * i) for i in range(4)]
    requests = [Request(p, 12, lambda ids, finish: None) for p in prompts]
    engine.submit(requests[0])
    engine.step()
    prefilled_rows = []
    real = engine_module.prefill_slots

    def counted(model, state, slots, *args):
        prefilled_rows.append(np.asarray(slots).tolist())
        return real(model, state, slots, *args)

    monkeypatch.setattr(engine_module, "prefill_slots", counted)
    for request in requests[1:]:
        engine.submit(request)
    engine.run_until_idle()
    assert prefilled_rows == [[1, 2, 3, 4]]
    alone = Generator(model, context=CONTEXT)
    for request, prompt in zip(requests, prompts, strict=True):
        assert request.generated == alone.generate([prompt], max_new_tokens=12)[0]
    assert all(rows == 1 or rows * bucket <= engine_module.PREFILL_TOKENS
               for rows, bucket in engine.prefill_shapes)
