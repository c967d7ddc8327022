"""headscore.track: sums from training steps equal offline score(); training itself is unchanged."""

import copy

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
