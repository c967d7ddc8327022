"""headscore.track: sums from training steps equal offline score(); training itself is unchanged."""

import copy
import gc
import weakref

import pytest
import torch
from tiny import random_examples, tiny_model

import headscore
from headscore.loss import example_losses
from headscore.methods.gradient import gate_gradients
from headscore.track import HeadscoreCallback

pytestmark = pytest.mark.usefixtures("one_thread")


def _prepared(dtype=torch.float64, n=10, seed=0):
    lm = tiny_model("llama", dtype=dtype, seed=seed)
    return headscore.prepare(lm, random_examples(n))


def _tracked_sums(prep, batch_size=4, **track_kwargs):
    model = prep.lm.model
    with headscore.track(model, tasks=prep.tasks, **track_kwargs) as tracker:
        for batch in prep.batches(batch_size, progress=False):
            tracker.set_tasks(batch.task_index)
            example_losses(model, batch).sum().backward()
        return tracker


@pytest.mark.parametrize("method", ["taylor", "abs", "fisher"])
def test_tracker_equals_offline_score(method):
    prep = _prepared()
    tracker = _tracked_sums(prep)
    offline = headscore.score(prep.lm, prep.examples, method=method, batch_size=4, progress=False)
    tracked = tracker.scores(method)
    assert tracked.tasks == offline.tasks and torch.equal(tracked.counts, offline.counts)
    torch.testing.assert_close(tracked.values, offline.values, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(tracked.stderr, offline.stderr, rtol=1e-5, atol=1e-12)
    assert tracker.forwards == 3 and tracker.steps == 3


def test_tracked_training_equals_untracked():
    prep = _prepared()
    batches = list(prep.batches(4, progress=False))
    results = []
    for tracked in (False, True):
        model = copy.deepcopy(prep.lm.model).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ctx = headscore.track(model, tasks=prep.tasks) if tracked else None
        tracker = ctx.__enter__() if ctx else None
        for _ in range(2):
            for batch in batches:
                if tracker:
                    tracker.set_tasks(batch.task_index)
                opt.zero_grad()
                example_losses(model, batch).mean().backward()
                opt.step()
        if ctx:
            ctx.__exit__(None, None, None)
            assert tracker.forwards == 6 and torch.isfinite(tracker.scores().values).all()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert all(p.requires_grad for p in model.parameters())


def test_gradient_accumulation_and_ema():
    prep = _prepared()
    model = prep.lm.model
    batches = list(prep.batches(2, progress=False))  # 5 micro-batches
    decay = 0.5
    with headscore.track(model, tasks=prep.tasks, ema=decay, auto_step=False) as tracker:
        for i, batch in enumerate(batches):
            tracker.set_tasks(batch.task_index)
            example_losses(model, batch).sum().backward()
            if i % 2 == 1 or i == len(batches) - 1:
                tracker.step()  # optimizer step every 2 micro-batches
    assert tracker.forwards == 5 and tracker.steps == 3
    offline = headscore.score(prep.lm, prep.examples, batch_size=2, progress=False)
    torch.testing.assert_close(tracker.scores().values, offline.values, rtol=1e-5, atol=1e-12)

    # EMA reference from independently computed per-step means
    with headscore.patch(model) as heads:
        grads = [(b.task_index, gate_gradients(model, heads, b)[1]) for b in batches]
    num_tasks = len(prep.tasks)
    ema = torch.zeros(num_tasks, 3, 4, dtype=torch.float64)
    weight = torch.zeros(num_tasks, dtype=torch.float64)
    for group in ([0, 1], [2, 3], [4]):
        idx = torch.cat([grads[i][0] for i in group])
        vals = -torch.cat([grads[i][1] for i in group])
        for t in range(num_tasks):
            if (idx == t).any():
                ema[t] = decay * ema[t] + (1 - decay) * vals[idx == t].mean(0)
                weight[t] = decay * weight[t] + (1 - decay)
    torch.testing.assert_close(tracker.ema("taylor"), ema / weight[:, None, None], rtol=1e-6, atol=1e-12)


def test_task_labels_argument_and_untracked_forwards():
    prep = _prepared(n=6)
    model = prep.lm.model
    with headscore.track(model, tasks=prep.tasks) as tracker:
        for batch in prep.batches(3, progress=False):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           task_labels=[prep.tasks[i] for i in batch.task_index]).logits
            logits.float().logsumexp(-1).mean().backward()
            with torch.no_grad():  # evaluation: not counted
                model(input_ids=batch.input_ids)
            model(input_ids=batch.input_ids, task_labels=batch.task_index)  # forward without backward
        assert tracker.forwards == 2
        assert int(tracker.scores().counts.sum()) == 6
        with pytest.raises(headscore.HeadscoreError, match="no task labels"):
            model(input_ids=batch.input_ids)
        with pytest.raises(headscore.HeadscoreError, match="rows"):
            model(input_ids=batch.input_ids, task_labels=[0])
    assert model.config._attn_implementation == "sdpa"


def test_autocast_bfloat16_close():
    prep = _prepared(dtype=torch.float32)
    full = _tracked_sums(prep).scores()
    model = prep.lm.model
    with headscore.track(model, tasks=prep.tasks) as tracker:
        for batch in prep.batches(4, progress=False):
            tracker.set_tasks(batch.task_index)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = example_losses(model, batch).sum()
            loss.backward()
    half = tracker.scores()
    assert torch.isfinite(half.values).all() and torch.equal(half.counts, full.counts)
    # bfloat16 activations of a random model with large weights: close, not equal
    x, y = full.values.flatten(), half.values.flatten()
    assert (x - y).norm() / x.norm() < 0.25
    assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.97


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_once(reentrant):
    prep = _prepared()
    model = prep.lm.model.train()
    plain = _tracked_sums(prep)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.model.layers[0].gradient_checkpointing
    try:
        checkpointed = _tracked_sums(prep)
    finally:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    assert checkpointed.forwards == plain.forwards == 3
    for method in ("taylor", "abs", "fisher"):
        a, b = plain.scores(method), checkpointed.scores(method)
        assert torch.equal(a.counts, b.counts)
        torch.testing.assert_close(b.values, a.values, rtol=1e-6, atol=1e-12)


def test_trainer_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    lm = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids, "task_labels": i % 2}
            for i, ids in enumerate(torch.randint(2, 90, (8, 12), generator=g))]
    out = tmp_path / "track.hs"
    callback = HeadscoreCallback(tasks=["even", "odd"], output=str(out))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=2, learning_rate=1e-3, report_to=[], remove_unused_columns=False, use_cpu=True,
        save_strategy="no", disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0)
    trainer = transformers.Trainer(model=lm.model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    scores = callback.scores
    assert scores.tasks == ["even", "odd"] and int(scores.counts.sum()) == 8
    assert torch.isfinite(scores.values).all() and scores.values.abs().sum() > 0
    assert callback.tracker.steps == 2 and callback.tracker.forwards == 4
    assert headscore.HeadScores.load(out).values.equal(scores.values)
    assert lm.model.config._attn_implementation == "sdpa"


def _trainer(transformers, model, tmp_path, callbacks, **overrides):
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids, "task_labels": i % 2}
            for i, ids in enumerate(torch.randint(2, 90, (8, 12), generator=g))]
    kwargs = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                  report_to=[], remove_unused_columns=False, use_cpu=True, save_strategy="no", disable_tqdm=True,
                  logging_strategy="no", dataloader_num_workers=0) | overrides
    args = transformers.TrainingArguments(**kwargs)
    return transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def test_trainer_callback_restores_the_model_when_train_raises(tmp_path):
    """train() raising skips on_train_end: close() restores the model; a later train() starts afresh."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class Interrupt(transformers.TrainerCallback):
        armed = True

        def on_step_end(self, args, state, control, **kwargs):
            if self.armed:
                self.armed = False
                raise KeyboardInterrupt

    model = tiny_model("llama").model
    callback, interrupt = HeadscoreCallback(tasks=["even", "odd"]), Interrupt()
    trainer = _trainer(transformers, model, tmp_path, [callback, interrupt])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    callback.close()
    callback.close()  # idempotent
    assert model.config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert int(callback.scores.counts.sum()) == 2  # the rows of the one step that ran
    ids = torch.randint(2, 90, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()  # an ordinary training step by hand works again

    interrupt.armed = True  # interrupted again, this time without close(): the next train() cleans up
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.train()
    assert int(callback.scores.counts.sum()) == 4 and callback.tracker.forwards == 2
    assert model.config._attn_implementation == "sdpa" and not model._forward_pre_hooks


def _scaled_loop(model, batches, scaler, overflow: int | None = None):
    """SGD over ``batches``, tracked, with each step's loss scaled by ``scaler`` (None: unscaled); step
    ``overflow``'s loss is made inf, as an fp16 overflow would."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with headscore.track(model, scaler=scaler) as tracker:
        for i, ids in enumerate(batches):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            if i == overflow:
                loss = loss * torch.tensor(float("inf"))
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
    return tracker


def test_gradscaler_scale_is_divided_out():
    """A GradScaler whose scale doubles every step: the tracked scores equal an unscaled loop's."""
    base = tiny_model("llama").model.train()
    batches = list(torch.randint(2, 90, (4, 3, 10), generator=torch.Generator().manual_seed(0)))
    plain = _scaled_loop(copy.deepcopy(base), batches, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    scaled = _scaled_loop(copy.deepcopy(base), batches, scaler)
    assert scaler.get_scale() == 2.0 ** 12 and scaled.skipped == 0
    for method in ("taylor", "fisher"):
        torch.testing.assert_close(scaled.scores(method).values, plain.scores(method).values, rtol=1e-6, atol=0)
    torch.testing.assert_close(scaled.ema(), plain.ema(), rtol=1e-6, atol=0)


def test_steps_with_non_finite_gate_gradients_are_not_counted():
    """A step whose loss overflows: the scaler skips it, and so does the tracker, whose scores equal an
    unscaled loop over the other steps."""
    base = tiny_model("llama").model.train()
    batches = list(torch.randint(2, 90, (4, 3, 10), generator=torch.Generator().manual_seed(0)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    with pytest.warns(RuntimeWarning, match="not finite") as caught:
        scaled = _scaled_loop(copy.deepcopy(base), batches + batches[1:2], scaler, overflow=1)
        scores = scaled.scores()
    assert scaler.get_scale() == 2.0 ** 11  # doubled, halved on the skipped step, doubled three times
    assert len([w for w in caught if "not finite" in str(w.message)]) == 1
    assert scaled.skipped == 1 and scaled.forwards == 4 and scores.extra["skipped"] == 1
    plain = _scaled_loop(copy.deepcopy(base), [batches[0], *batches[2:], batches[1]], None)
    assert torch.equal(scores.counts, plain.scores().counts)
    torch.testing.assert_close(scores.values, plain.scores().values, rtol=1e-6, atol=0)
    assert torch.isfinite(scaled.ema()).all()


def test_trainer_callback_divides_out_the_trainers_scaler(tmp_path):
    """The Trainer's loss scaler (accelerate's, on its optimizer) is divided out: the same scores as unscaled."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    base = tiny_model("llama").model
    scores = []
    for scaled in (False, True):
        callback = HeadscoreCallback(tasks=["even", "odd"])
        trainer = _trainer(transformers, copy.deepcopy(base), tmp_path, [callback], max_steps=3, max_grad_norm=0)
        if scaled:  # what fp16 mixed precision sets up on a GPU
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
        trainer.train()
        scores.append(callback.scores.values)
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 11
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-6, atol=0)


def _own_gate_gradients(model, passes):
    """Reference: each pass's dL/dg [B, L, H] from its own loss, through headscore.patch and autograd.grad."""
    out = []
    with headscore.patch(model) as heads:
        for ids in passes:
            gates = heads.ones(ids.shape[0], requires_grad=True, dtype=torch.float64)
            with heads.using(gates):
                loss = model(input_ids=ids, labels=ids).loss
            out.append(torch.autograd.grad(loss, gates)[0])
    return out


def _checkpointed(model, reentrant):
    model.train().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_two_forward_passes_one_backward(reentrant):
    """Passes A and B, then (loss_a + loss_b).backward(): each pass's rows get its own gradient. Re-entrant
    recomputation gates with the gates of the pass it recomputes (any shapes); non-reentrant needs one shape."""
    base = tiny_model("llama", dtype=torch.float64).model
    g = torch.Generator().manual_seed(1)
    a = torch.randint(2, 90, (2, 10), generator=g)
    b = torch.randint(2, 90, (3, 7) if reentrant else (2, 10), generator=g)
    rows_a, rows_b = len(a), len(b)
    want = _own_gate_gradients(base, [a, b])
    model = _checkpointed(copy.deepcopy(base), reentrant)
    with headscore.track(model, tasks=["A", "B"]) as tracker:
        loss_a = model(input_ids=a, labels=a, task_labels=[0] * rows_a).loss
        loss_b = model(input_ids=b, labels=b, task_labels=[1] * rows_b).loss
        (loss_a + loss_b).backward()
        scores = tracker.scores("taylor")
        # a pass whose graph is dropped unused, then the other order of backward passes, tasks swapped
        gc.disable()  # the dropped pass's gates go with its graph, at once (no reference cycle)
        try:
            model(input_ids=b, labels=b, task_labels=[1] * rows_b)
            dropped = weakref.ref(tracker.heads.gates)
            loss_b = model(input_ids=b, labels=b, task_labels=[0] * rows_b).loss
            assert dropped() is None
        finally:
            gc.enable()
        loss_a = model(input_ids=a, labels=a, task_labels=[1] * rows_a).loss
        loss_a.backward()
        loss_b.backward()
        later = tracker.scores("taylor")
    assert scores.counts.tolist() == [rows_a, rows_b] and tracker.forwards == 4
    assert later.counts.tolist() == [rows_a + rows_b] * 2
    if reentrant:  # a paused pass with a graph, backpropagated with a tracked one: recomputed ungated
        with headscore.track(model, tasks=["A", "B"]) as tracker:
            with tracker.paused():
                loss_b = model(input_ids=b, labels=b).loss
            loss_a = model(input_ids=a, labels=a, task_labels=[0] * rows_a).loss
            (loss_a + loss_b).backward()
            paused = tracker.scores("taylor")
        assert paused.counts.tolist() == [rows_a, 0]
        torch.testing.assert_close(paused.values[0], -want[0].mean(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(scores.values, torch.stack([-w.mean(0) for w in want]), rtol=1e-9, atol=1e-12)
    both = [-torch.cat([want[0], want[1]]).mean(0), -torch.cat([want[1], want[0]]).mean(0)]
    torch.testing.assert_close(later.values, torch.stack(both), rtol=1e-9, atol=1e-12)
    assert model.config._attn_implementation == "sdpa" and not model._forward_hooks


def test_non_reentrant_checkpointing_refuses_two_waiting_passes_of_different_shapes():
    model = _checkpointed(tiny_model("llama").model, False)
    with headscore.track(model) as tracker:
        waiting = model(input_ids=torch.randint(2, 90, (2, 10))).logits
        with pytest.raises(headscore.HeadscoreError, match="non-reentrant"):
            model(input_ids=torch.randint(2, 90, (3, 10)))
        waiting.sum().backward()
        model(input_ids=torch.randint(2, 90, (3, 10)))  # nothing waits any more
        assert tracker.forwards == 1


def test_own_checkpointing_function_refuses_a_second_waiting_pass():
    """compat.activation_checkpointing tells the modes apart; with a checkpointing function of the user's (or
    transformers' offloading one) a second pass may not start while one awaits its backward."""
    from torch.utils.checkpoint import checkpoint

    from headscore import compat

    model = tiny_model("llama", dtype=torch.float64).model
    ids = torch.randint(2, 90, (2, 10))
    want = _own_gate_gradients(model, [ids])[0]
    assert compat.activation_checkpointing(model) is None
    for reentrant in (True, False):
        _checkpointed(model, reentrant)
        assert compat.activation_checkpointing(model) == ("reentrant" if reentrant else "non-reentrant")
    assert compat.activation_checkpointing(model.eval()) is None  # layers checkpoint only in training
    model.train()
    for layer in model.model.layers:
        layer._gradient_checkpointing_func = lambda fn, *args: checkpoint(fn, *args, use_reentrant=True)
    assert compat.activation_checkpointing(model) == "other"
    with headscore.track(model) as tracker:
        loss = model(input_ids=ids, labels=ids).loss
        with pytest.raises(headscore.HeadscoreError, match="awaits its backward"):
            model(input_ids=ids, labels=ids)
        loss.backward()
        model(input_ids=ids, labels=ids)  # nothing waits any more
        scores = tracker.scores()
    assert tracker.forwards == 1
    torch.testing.assert_close(scores.values[0], -want.mean(0), rtol=1e-9, atol=1e-12)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["qwen3_next", "jamba", "laguna"])
def test_tracker_finds_layers_without_attention(family):
    """Without headscore.prepare, a hybrid model's layers without attention (Qwen3-Next, Jamba) and the heads a
    layer does not have (Laguna: 4 and 2) are NaN in scores() and ema(), and the rest equal offline score()
    on a prepared copy of the same model (float64 models)."""

    import model_matrix
    from tiny_saved import char_tokenizer

    from headscore.patch import head_layout

    reference = headscore.LoadedModel(model_matrix.build_model(family, seed=1), char_tokenizer(), family)
    prep = headscore.prepare(reference, random_examples(6))
    tracked = model_matrix.build_model(family, seed=1)
    assert "_headscore_attention_layers" not in tracked.__dict__  # not marked: the tracker finds the layers
    with headscore.track(tracked, tasks=prep.tasks) as tracker:
        assert torch.isnan(tracker.ema()).all()  # nothing seen yet
        for batch in prep.batches(4, progress=False):
            tracker.set_tasks(batch.task_index)
            example_losses(tracked, batch).sum().backward()
    offline = headscore.score(reference, prep.examples, batch_size=4, progress=False)
    missing = head_layout(reference.model).absent_heads()
    assert missing.any() and not missing.all()
    scores = tracker.scores()
    assert torch.equal(torch.isnan(scores.values), missing.expand_as(scores.values))
    torch.testing.assert_close(scores.values, offline.values, rtol=1e-6, atol=1e-12, equal_nan=True)
    assert torch.equal(torch.isnan(tracker.ema()), missing.expand_as(scores.values))


def _tracked_first_pass_then(call) -> tuple[headscore.HeadScores, headscore.HeadScores]:
    """The tracker's taylor after one tracked pass followed by ``call(model, ids)``, and after that pass alone."""
    out = []
    for extra in (call, None):
        lm = tiny_model("llama", dtype=torch.float64)
        ids = torch.randint(2, 90, (2, 8), generator=torch.Generator().manual_seed(0))
        with headscore.track(lm.model) as tracker:
            lm.model(input_ids=ids, labels=ids).loss.backward()
            if extra is not None:
                extra(lm.model, ids.flip(0))
            out.append(tracker.scores("taylor"))
    return out[0], out[1]


@pytest.mark.parametrize("call", ["inner model", "forward", "inner model, another batch size"])
def test_calls_that_bypass_the_tracked_model_are_not_gated(call):
    """A forward pass that does not go through ``model(...)`` (an extra loss on the inner model's hidden states,
    ``model.forward``) runs ungated and is not counted: before, the previous pass's gates gated it and its
    gradient was added to that pass's rows (or, for another batch size, it failed)."""
    def run(model, ids):
        if call == "forward":
            model.forward(input_ids=ids, labels=ids).loss.backward()
        else:
            rows = ids if call == "inner model" else torch.cat([ids, ids[:1]])
            model.model(input_ids=rows).last_hidden_state.pow(2).sum().backward()

    got, alone = _tracked_first_pass_then(run)
    assert torch.equal(got.counts, alone.counts)
    torch.testing.assert_close(got.values, alone.values, rtol=0, atol=0)


def test_a_second_backward_after_the_pass_was_counted_warns():
    """``retain_graph=True`` and a second backward after ``scores()`` folded the pass: not counted, and said."""
    lm = tiny_model("llama", dtype=torch.float64)
    ids = torch.randint(2, 90, (2, 8))
    with headscore.track(lm.model) as tracker:
        loss = lm.model(input_ids=ids, labels=ids).loss
        loss.backward(retain_graph=True)
        first = tracker.scores("taylor").values
        with pytest.warns(RuntimeWarning, match="already counted"):
            loss.backward()
        torch.testing.assert_close(tracker.scores("taylor").values, first, rtol=0, atol=0)
        assert tracker.late == 1 and tracker.forwards == 1
